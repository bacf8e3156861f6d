//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"runtime"
	"slices"
	"testing"
	"time"
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

// A flush handed over without waiting runs its ops on the device thread
// in order; its error surfaces at the next call that waits (and at Sync's
// caller once), the ops handed over after it are skipped, and ops queued
// after that error has been taken run again. No GPU: the ops here touch
// no context.
func TestFlushErrorSurfacesAtNextWait(t *testing.T) {
	for _, wait := range []bool{false, true} {
		d := threadOnly()
		b := NewOnDevice(d, Options{NoGraphs: true, WaitFlushes: wait})
		b.prof, b.steps = nil, nil
		var ran []string
		op := func(name string, err error) {
			b.do(name, func(*Ctx) error {
				ran = append(ran, name)
				return err
			})
		}
		op("a", nil)
		b.flush()
		op("b", errors.New("broken"))
		op("c", nil)
		b.flush()
		op("d", nil)
		b.flush()
		b.now("check", func(*Ctx) error { return nil })
		if b.err == nil || b.err.Error() != "cuda backend: b: broken" {
			t.Fatalf("wait %v: error %v after the failed flush, want cuda backend: b: broken", wait, b.err)
		}
		b.err = nil // as Sync hands it out
		op("e", nil)
		b.now("check", func(*Ctx) error { return nil })
		// Handed over, "d" reaches the device thread, which skips it;
		// waiting, the flush records the error before "d" is queued, and
		// do drops it.
		want := []string{"a", "b", "e"}
		if b.err != nil || !slices.Equal(ran, want) {
			t.Fatalf("wait %v: ran %v, error %v; want %v and none", wait, ran, b.err, want)
		}
		close(d.calls)
	}
}

// A device its owner drops without Close stays reachable from its thread.
// Its launch arguments are pinned (Ctx.pin), and a Ctx collected with pins
// held makes the runtime panic from a finalizer ("found leaking pinned
// pointer"): without the KeepAlive in serve, this test's process dies in
// the collections below, as `mmfp4 logits` on a GPU did now and then.
func TestDroppedDeviceKeepsItsPins(t *testing.T) {
	func() {
		d := threadOnly()
		d.c = &Ctx{argVals: make([]uint64, 4)}
		d.c.pin.Pin(&d.c.argVals[0])
		if err := d.Do(func(*Ctx) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}()
	for range 5 {
		runtime.GC()
		time.Sleep(20 * time.Millisecond)
	}
}
