package cpu

import (
	"fmt"
	"math"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/safetensors"
)

// pool is the paged latent cache on the host. Every slot (block*blockSize +
// offset) of every layer holds one token's latent c and rotated k_pe, c
// first, in the pool's dtype:
//   - f32, bf16: the rank+ropeDim values;
//   - fp8: E4M3 codes, with one float32 scale for c and one for k_pe
//     (amax/448 of each);
//   - fp4: c as E2M1 codes two to a byte (low nibble first), an E4M3 scale
//     per group of FP4Group values relative to the token's float32 scale
//     for c (amax/(6*448)); k_pe as in fp8, E4M3 codes with a float32 scale
//     (amax/448). k_pe in fp4 cost the built-in model +1.9% perplexity, in
//     fp8 +0.24%, for 30 more bytes a token and layer.
type pool struct {
	layers, blocks, blockSize, rank, ropeDim int
	dtype                                    backend.CacheDType

	f32   [][]float32 // per layer: slots*(rank+ropeDim)
	bf16  [][]uint16  // per layer: slots*(rank+ropeDim)
	codes [][]byte    // per layer: slots*codeBytes
	group [][]byte    // per layer, fp4: slots*groupsOf(rank) E4M3 scales of c
	scale [][]float32 // per layer, fp8 and fp4: slots*2 (c, k_pe)
}

func (p *pool) Layers() int               { return p.layers }
func (p *pool) Blocks() int               { return p.blocks }
func (p *pool) BlockSize() int            { return p.blockSize }
func (p *pool) DType() backend.CacheDType { return p.dtype }

func (p *pool) width() int { return p.rank + p.ropeDim }

func groupsOf(n int) int { return (n + backend.FP4Group - 1) / backend.FP4Group }

// codeBytes is the size of a slot's codes: fp8 one byte a value; fp4 half
// a byte for each value of c and one for each of k_pe.
func (p *pool) codeBytes() int {
	if p.dtype == backend.CacheFP4 {
		return p.rank/2 + p.ropeDim
	}
	return p.width()
}

// NewCachePool allocates a paged latent cache.
func (b *Backend) NewCachePool(layers, blocks, blockSize, rank, ropeDim int, dtype backend.CacheDType) (backend.CachePool, error) {
	if layers <= 0 || blocks <= 0 || blockSize <= 0 || rank <= 0 || ropeDim < 0 || rank%2 != 0 || ropeDim%2 != 0 {
		return nil, fmt.Errorf("cpu backend: cache pool of %d layers, %d blocks of %d, rank %d, rope dims %d", layers, blocks, blockSize, rank, ropeDim)
	}
	p := &pool{layers: layers, blocks: blocks, blockSize: blockSize, rank: rank, ropeDim: ropeDim, dtype: dtype}
	slots, w := blocks*blockSize, p.width()
	for l := 0; l < layers; l++ {
		switch dtype {
		case backend.CacheF32:
			p.f32 = append(p.f32, make([]float32, slots*w))
		case backend.CacheBF16:
			p.bf16 = append(p.bf16, make([]uint16, slots*w))
		case backend.CacheFP8:
			p.codes = append(p.codes, make([]byte, slots*p.codeBytes()))
			p.scale = append(p.scale, make([]float32, slots*2))
		case backend.CacheFP4:
			p.codes = append(p.codes, make([]byte, slots*p.codeBytes()))
			p.group = append(p.group, make([]byte, slots*groupsOf(rank)))
			p.scale = append(p.scale, make([]float32, slots*2))
		default:
			return nil, fmt.Errorf("cpu backend: cache dtype %v", dtype)
		}
	}
	return p, nil
}

func asPool(c backend.CachePool) *pool {
	p, ok := c.(*pool)
	if !ok {
		panic(fmt.Sprintf("cpu backend: cache pool of type %T from another backend", c))
	}
	return p
}

// store encodes one token's c and k_pe into slot of layer.
func (p *pool) store(layer, slot int, c, kpe []float32) {
	w := p.width()
	switch p.dtype {
	case backend.CacheF32:
		dst := p.f32[layer][slot*w : (slot+1)*w]
		copy(dst, c)
		copy(dst[p.rank:], kpe)
	case backend.CacheBF16:
		dst := p.bf16[layer][slot*w : (slot+1)*w]
		for i, v := range c {
			dst[i] = safetensors.Float32ToBF16(v)
		}
		for i, v := range kpe {
			dst[p.rank+i] = safetensors.Float32ToBF16(v)
		}
	case backend.CacheFP8:
		dst := p.codes[layer][slot*w : (slot+1)*w]
		sc := p.scale[layer][slot*2 : slot*2+2]
		sc[0] = encodeFP8(c, dst[:p.rank])
		sc[1] = encodeFP8(kpe, dst[p.rank:])
	case backend.CacheFP4:
		n, gc := p.codeBytes(), groupsOf(p.rank)
		dst := p.codes[layer][slot*n : (slot+1)*n]
		sc := p.scale[layer][slot*2 : slot*2+2]
		sc[0] = encodeFP4(c, dst[:p.rank/2], p.group[layer][slot*gc:(slot+1)*gc])
		sc[1] = encodeFP8(kpe, dst[p.rank/2:])
	}
}

// load returns slot's values of layer, c then k_pe: the stored slice itself
// for f32, else decoded into buf.
func (p *pool) load(layer, slot int, buf []float32) []float32 {
	w := p.width()
	switch p.dtype {
	case backend.CacheF32:
		return p.f32[layer][slot*w : (slot+1)*w]
	case backend.CacheBF16:
		for i, v := range p.bf16[layer][slot*w : (slot+1)*w] {
			buf[i] = safetensors.BF16ToFloat32(v)
		}
	case backend.CacheFP8:
		sc := p.scale[layer][slot*2 : slot*2+2]
		codes := p.codes[layer][slot*w : (slot+1)*w]
		decodeFP8(codes[:p.rank], sc[0], buf[:p.rank])
		decodeFP8(codes[p.rank:], sc[1], buf[p.rank:w])
	case backend.CacheFP4:
		n, gc := p.codeBytes(), groupsOf(p.rank)
		codes := p.codes[layer][slot*n : (slot+1)*n]
		sc := p.scale[layer][slot*2 : slot*2+2]
		decodeFP4(codes[:p.rank/2], p.group[layer][slot*gc:(slot+1)*gc], sc[0], buf[:p.rank])
		decodeFP8(codes[p.rank/2:], sc[1], buf[p.rank:w])
	}
	return buf[:w]
}

func absMax(x []float32) float32 {
	var m float32
	for _, v := range x {
		m = max(m, float32(math.Abs(float64(v))))
	}
	return m
}

// encodeFP8 writes E4M3 codes of x/scale with scale = amax/448 and returns
// the scale (0 for an all-zero x).
func encodeFP8(x []float32, codes []byte) float32 {
	scale := absMax(x) / format.E4M3Max
	if scale == 0 || scale != scale {
		clear(codes)
		return scale
	}
	inv := 1 / scale
	for i, v := range x {
		codes[i] = format.E4M3Encode(v * inv)
	}
	return scale
}

// decodeFP8 is the inverse of encodeFP8: out[i] = e4m3(codes[i]) * scale.
func decodeFP8(codes []byte, scale float32, out []float32) {
	for i, v := range codes {
		out[i] = e4m3Table[v] * scale
	}
}

// encodeFP4 writes E2M1 codes of x in groups of FP4Group, each group with an
// E4M3 scale relative to the returned token scale amax/(6*448). A group's
// scale is rounded up when rounding to nearest would clip its largest value.
func encodeFP4(x []float32, codes, groupScales []byte) float32 {
	clear(codes)
	clear(groupScales)
	ts := absMax(x) / (6 * format.E4M3Max)
	if ts == 0 || ts != ts {
		return ts
	}
	for g := range groupScales {
		seg := x[g*backend.FP4Group : min((g+1)*backend.FP4Group, len(x))]
		amax := absMax(seg)
		s := format.E4M3Encode(amax / 6 / ts)
		for s < 0x7E && e4m3Table[s]*ts*6 < amax {
			s++
		}
		groupScales[g] = s
		d := e4m3Table[s] * ts
		if d == 0 {
			continue
		}
		inv := 1 / d
		base := g * backend.FP4Group
		for i, v := range seg {
			k := base + i
			codes[k/2] |= format.E2M1Encode(v*inv) << (4 * (k % 2))
		}
	}
	return ts
}

func decodeFP4(codes, groupScales []byte, ts float32, out []float32) {
	for g, s := range groupScales {
		d := e4m3Table[s] * ts
		for k := g * backend.FP4Group; k < min((g+1)*backend.FP4Group, len(out)); k++ {
			out[k] = d * format.E2M1Decode(codes[k/2]>>(4*(k%2)))
		}
	}
}
