package cuda

import (
	"errors"
	"testing"
)

// fakeDevice hands out addresses and can run out of memory.
type fakeDevice struct {
	next, used, limit uint64
	live              map[uint64]uint64
	mallocs, frees    int
}

func (f *fakeDevice) malloc(n uint64) (uint64, error) {
	if f.used+n > f.limit {
		return 0, errors.New("out of memory")
	}
	f.next += 1 << 32
	f.live[f.next] = n
	f.used += n
	f.mallocs++
	return f.next, nil
}

func (f *fakeDevice) free(p uint64) error {
	n, ok := f.live[p]
	if !ok {
		return errors.New("bad free")
	}
	delete(f.live, p)
	f.used -= n
	f.frees++
	return nil
}

func TestRoundSize(t *testing.T) {
	for _, c := range []struct{ in, want uint64 }{
		{1, 256}, {256, 256}, {257, 512}, {1000, 1024}, {1 << 20, 1 << 20},
		{1<<20 + 1, 2 << 20}, {3 << 20, 4 << 20}, {4 << 20, 4 << 20}, {5<<20 + 7, 6 << 20},
	} {
		if got := roundSize(c.in); got != c.want {
			t.Errorf("roundSize(%d) = %d, want %d", c.in, got, c.want)
		}
	}
}

func TestPoolReuseAndTrim(t *testing.T) {
	f := &fakeDevice{limit: 12 << 20, live: map[uint64]uint64{}}
	p := newPool(f.malloc, f.free)
	a, err := p.alloc(1000)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := p.alloc(3 << 20)
	if err := p.release(a); err != nil {
		t.Fatal(err)
	}
	if err := p.release(a); err == nil {
		t.Fatal("double free not reported")
	}
	// Same size class: the cached block comes back without a driver call.
	c, _ := p.alloc(900)
	if c != a || f.mallocs != 2 {
		t.Fatalf("reuse: got %#x (want %#x), %d mallocs", c, a, f.mallocs)
	}
	if s := p.stats(); s.InUse != 1024+4<<20 || s.Cached != 0 || s.Peak != 1024+4<<20 {
		t.Fatalf("stats %+v", s)
	}
	// Out of memory: the cached 4 MiB block is given back, then it fits.
	p.release(b)
	d, err := p.alloc(9 << 20)
	if err != nil {
		t.Fatalf("alloc after trim: %v", err)
	}
	if f.frees != 1 || p.stats().Cached != 0 {
		t.Fatalf("trim: %d frees, %+v", f.frees, p.stats())
	}
	if _, err := p.alloc(9 << 20); err == nil {
		t.Fatal("over the limit: no error")
	}
	p.release(c)
	p.release(d)
	if err := p.trim(); err != nil || len(f.live) != 0 {
		t.Fatalf("trim: %v, %d blocks still live", err, len(f.live))
	}
}
