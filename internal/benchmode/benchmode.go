// Package benchmode lets benchmarks stand down where timing runs are not
// wanted: with ALPHAHENG_TASK_MODE=1 they exit early with a message.
package benchmode

import (
	"os"
	"testing"
)

// Off reports whether benchmarks are switched off.
func Off() bool { return os.Getenv("ALPHAHENG_TASK_MODE") == "1" }

// Check skips b, with a message, when benchmarks are switched off.
func Check(b *testing.B) {
	b.Helper()
	if Off() {
		b.Skip("benchmarks are off (ALPHAHENG_TASK_MODE=1)")
	}
}
