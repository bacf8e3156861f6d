package bench

import (
	"fmt"
	"io"
	"sync"
	"time"
)

// progress prints one line when a phase starts, a line every tick while it
// runs (so a long prefill does not look hung, and the lines read well in a
// log file), and one when it ends.
type progress struct {
	w     io.Writer
	every time.Duration

	mu     sync.Mutex
	name   string
	start  time.Time
	detail func() string
	stop   chan struct{}
	done   chan struct{}
}

func newProgress(w io.Writer) *progress {
	return &progress{w: w, every: 10 * time.Second}
}

// phase ends the current phase, if any, and starts one; detail, if set,
// adds to each periodic line.
func (p *progress) phase(name string, detail func() string) {
	if p.w == nil {
		return
	}
	p.end()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.name, p.start, p.detail = name, time.Now(), detail
	p.stop, p.done = make(chan struct{}), make(chan struct{})
	fmt.Fprintf(p.w, "bench: %s ...\n", name)
	go p.tick(p.stop, p.done, name, p.start, detail)
}

func (p *progress) tick(stop, done chan struct{}, name string, start time.Time, detail func() string) {
	defer close(done)
	t := time.NewTicker(p.every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			extra := ""
			if detail != nil {
				extra = ", " + detail()
			}
			fmt.Fprintf(p.w, "bench: %s: %.0f s%s\n", name, time.Since(start).Seconds(), extra)
		}
	}
}

// end stops the ticker of the current phase.
func (p *progress) end() {
	p.mu.Lock()
	stop, done := p.stop, p.done
	p.stop, p.done = nil, nil
	p.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

// donef ends the current phase with a result line.
func (p *progress) donef(format string, args ...any) {
	if p.w == nil {
		return
	}
	p.end()
	p.mu.Lock()
	name, start := p.name, p.start
	p.mu.Unlock()
	msg := fmt.Sprintf(format, args...)
	if msg != "" {
		msg = ": " + msg
	}
	fmt.Fprintf(p.w, "bench: %s done in %.1f s%s\n", name, time.Since(start).Seconds(), msg)
}

// warnf prints a line at once, outside the phase lines.
func (p *progress) warnf(format string, args ...any) {
	if p.w == nil {
		return
	}
	fmt.Fprintf(p.w, "bench: warning: "+format+"\n", args...)
}
