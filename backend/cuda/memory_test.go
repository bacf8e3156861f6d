//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// TestDeviceMemoryCounts checks DeviceMemory against sizes computed here:
// a quantized and a dense weight, a cache pool, and the device's own
// free/total figures moving with an allocation.
func TestDeviceMemoryCounts(t *testing.T) {
	g, _ := testBackends(t, Options{})
	r := rand.New(rand.NewPCG(7, 7))
	before, err := g.DeviceMemory()
	if err != nil {
		t.Fatal(err)
	}
	q := quantHost(t, r, "q", 96, 256, 32)
	mustWeight(t, g, q)
	mustWeight(t, g, denseHost(r, "d", 3, 100))
	// codes, scales, row scales, each at a 256-byte boundary; then the dense
	// floats, rounded up to 256 bytes.
	wantW := int64(align(align(align(len(q.Quant.Codes), 256)+len(q.Quant.Scales), 256)+4*96, 256) + align(4*300, 256))
	pool, err := g.NewCachePool(3, 5, 16, 64, 16, backend.CacheBF16)
	if err != nil {
		t.Fatal(err)
	}
	_ = pool
	wantC := int64(3 * align(5*16*2*(64+16), 256))
	after, err := g.DeviceMemory()
	if err != nil {
		t.Fatal(err)
	}
	if got := after.WeightBytes - before.WeightBytes; got != wantW {
		t.Errorf("weight bytes grew by %d, want %d", got, wantW)
	}
	if got := after.CacheBytes - before.CacheBytes; got != wantC {
		t.Errorf("cache bytes grew by %d, want %d", got, wantC)
	}
	if !(after.UploadSeconds > before.UploadSeconds) {
		t.Errorf("upload time did not grow: %v then %v", before.UploadSeconds, after.UploadSeconds)
	}
	if after.TotalBytes <= 0 || after.FreeBytes <= 0 || after.FreeBytes > after.TotalBytes {
		t.Errorf("device memory free %d of %d", after.FreeBytes, after.TotalBytes)
	}
	// The first weight takes a whole slab chunk from the device.
	if before.FreeBytes-after.FreeBytes < slabChunk {
		t.Errorf("free memory fell by %d after the first weights, want at least a %d-byte slab chunk", before.FreeBytes-after.FreeBytes, slabChunk)
	}
}
