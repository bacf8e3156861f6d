package cuda

import (
	"fmt"
	"math/bits"
)

// pool is a caching allocator over the driver's allocation calls. Freed
// blocks are kept in per-size free lists and handed out again without a
// driver call (cuMemAlloc and cuMemFree synchronise and cost tens of
// microseconds). Reuse is safe in stream order: a block freed after work
// was queued on the device's stream is only reused by work queued later on
// that same stream.
//
// Sizes round up to a power of two up to 1 MiB and to a multiple of 2 MiB
// above, so small per-step buffers find each other's blocks. Long-lived
// large data (weights) should be one allocation, sub-divided by the caller.
type pool struct {
	malloc func(n uint64) (uint64, error)
	free   func(p uint64) error

	cached map[uint64][]uint64 // rounded size -> free blocks
	live   map[uint64]uint64   // block -> rounded size

	inUse, cachedBytes, peak uint64
}

// PoolStats reports the allocator's device memory, in bytes.
type PoolStats struct {
	InUse  uint64 // handed out and not freed
	Cached uint64 // freed, held for reuse
	Peak   uint64 // largest InUse so far
}

func newPool(malloc func(uint64) (uint64, error), free func(uint64) error) *pool {
	return &pool{malloc: malloc, free: free, cached: map[uint64][]uint64{}, live: map[uint64]uint64{}}
}

const (
	smallLimit = 1 << 20
	largeUnit  = 2 << 20
	minBlock   = 256
)

// roundSize is the block size that serves a request of n bytes.
func roundSize(n uint64) uint64 {
	switch {
	case n <= minBlock:
		return minBlock
	case n <= smallLimit:
		return 1 << bits.Len64(n-1)
	default:
		return (n + largeUnit - 1) / largeUnit * largeUnit
	}
}

// alloc returns a block of at least n bytes. When the driver is out of
// memory, the cached blocks are released and the allocation tried again.
func (p *pool) alloc(n uint64) (uint64, error) {
	if n == 0 {
		return 0, fmt.Errorf("cuda: allocation of 0 bytes")
	}
	size := roundSize(n)
	var ptr uint64
	if free := p.cached[size]; len(free) > 0 {
		ptr = free[len(free)-1]
		p.cached[size] = free[:len(free)-1]
		p.cachedBytes -= size
	} else {
		var err error
		ptr, err = p.malloc(size)
		if err != nil && p.cachedBytes > 0 {
			if terr := p.trim(); terr != nil {
				return 0, terr
			}
			ptr, err = p.malloc(size)
		}
		if err != nil {
			return 0, fmt.Errorf("allocating %d bytes (%d in use, %d cached): %w", size, p.inUse, p.cachedBytes, err)
		}
	}
	p.live[ptr] = size
	p.inUse += size
	p.peak = max(p.peak, p.inUse)
	return ptr, nil
}

// release returns a block to the cache.
func (p *pool) release(ptr uint64) error {
	size, ok := p.live[ptr]
	if !ok {
		return fmt.Errorf("cuda: free of %#x, which this allocator did not hand out (or freed twice)", ptr)
	}
	delete(p.live, ptr)
	p.inUse -= size
	p.cached[size] = append(p.cached[size], ptr)
	p.cachedBytes += size
	return nil
}

// trim gives every cached block back to the driver.
func (p *pool) trim() error {
	var first error
	for size, blocks := range p.cached {
		for _, b := range blocks {
			if err := p.free(b); err != nil && first == nil {
				first = err
			}
			p.cachedBytes -= size
		}
		delete(p.cached, size)
	}
	return first
}

func (p *pool) stats() PoolStats {
	return PoolStats{InUse: p.inUse, Cached: p.cachedBytes, Peak: p.peak}
}
