//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"testing"
)

// threadOnly is a Device whose thread runs closures without a GPU (its
// context is nil), for the hand-over between threads.
func threadOnly() *Device {
	d := &Device{calls: make(chan func(), queuedCalls)}
	go d.serve()
	return d
}

// Closures handed over with Go run in order, before a later Do, and a
// panic in one is raised by the next Do, not lost.
func TestGoRunsInOrderBeforeDo(t *testing.T) {
	d := threadOnly()
	defer close(d.calls)
	var got []int
	for i := range 3 * queuedCalls {
		d.Go(func(*Ctx) { got = append(got, i) })
	}
	err := d.Do(func(*Ctx) error {
		if len(got) != 3*queuedCalls {
			return errors.New("Do ran before the closures handed over")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range got {
		if v != i {
			t.Fatalf("closure %d ran as %d", i, v)
		}
	}

	d.Go(func(*Ctx) { panic("late") })
	ran := false
	d.Go(func(*Ctx) { ran = true })
	pv := func() (pv any) {
		defer func() { pv = recover() }()
		d.Do(func(*Ctx) error { return nil })
		return nil
	}()
	if pv != "late" || !ran {
		t.Fatalf("Do after a panicking Go: panic %v, closure after it ran %v; want late and true", pv, ran)
	}
	if err := d.Do(func(*Ctx) error { return nil }); err != nil {
		t.Fatalf("Do after the panic was raised: %v", err)
	}
}
