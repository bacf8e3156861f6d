package glm4moelite

import (
	"errors"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend/cpu"
)

// Interrupt is asked before each layer; its error abandons the pass at once
// and leaves the state where it was, so the same tokens can run again.
func TestForwardInterruptBetweenLayers(t *testing.T) {
	ref := loadReference(t)
	m := loadModel(t, fixtureDir, cpu.Options{}, LoadOptions{})
	want := allLogits(t, m, ref.prompt)

	s := newState(t, m, len(ref.prompt))
	stop := errors.New("stop")
	calls := 0
	s.Interrupt = func() error {
		calls++
		if calls == 3 {
			return stop
		}
		return nil
	}
	if _, err := m.ForwardSeq(s, ref.prompt, true); !errors.Is(err, stop) {
		t.Fatalf("err = %v, want the interrupt's error", err)
	}
	if calls != 3 || s.Pos != 0 {
		t.Errorf("interrupt asked %d times (want 3: layers 0, 1, 2), position %d (want 0)", calls, s.Pos)
	}
	s.Interrupt = nil
	got, err := m.ForwardSeq(s, ref.prompt, true)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Error("the interrupted state gives other logits when run again")
	}
}
