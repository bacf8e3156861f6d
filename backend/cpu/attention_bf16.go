package cpu

import (
	"github.com/mmfp4/mmfp4/backend"
	"math"
	"os"
	"strconv"
	"time"
)

// evenOdd32 writes src into dst with each block of 32 values reordered:
// the 16 even-indexed values, then the 16 odd-indexed ones. That is the
// order in which the bf16 attention kernels widen a block of the cache.
func evenOdd32(dst, src []float32) {
	for b := 0; b+32 <= len(src); b += 32 {
		for i := 0; i < 16; i++ {
			dst[b+i] = src[b+2*i]
			dst[b+16+i] = src[b+2*i+1]
		}
	}
}

// bf16Queries writes each head's queries for attendBF16 into q (heads rows
// of rank+ropeDim, as a cached row is laid out): the absorbed query
// (qrow), then q_pe (the rotary part of qmrow), each block of 32 in
// even-then-odd order.
func (b *Backend) bf16Queries(q, qrow, qmrow []float32, s backend.MLAShape) {
	H, r, qk := s.Heads, s.Rank, s.NopeDim+s.RopeDim
	w := r + s.RopeDim
	eo := func(dst, src []float32) {
		if !evenOdd32SIMD(b.isa, dst, src) {
			evenOdd32(dst, src)
		}
	}
	for h := 0; h < H; h++ {
		eo(q[h*w:h*w+r], qrow[h*r:(h+1)*r])
		eo(q[h*w+r:(h+1)*w], qmrow[h*qk+s.NopeDim:(h+1)*qk])
	}
}

var attendFused = func() int {
	v, err := strconv.Atoi(os.Getenv("MMFP4_ATT_TILES"))
	if err != nil {
		return 1064064
	}
	return v
}() // measurement switch

// attendBF16 is attendSpans for positions [j0, j1) of seq in a bf16 pool,
// read in place: the kernels widen each block of a cached row once for
// four heads, instead of converting every row to float32 first. q is the
// row's queries from bf16Queries; the caller checks hasBF16Attention.
func (b *Backend) attendBF16(out, q []float32, p *pool, layer int, seq *backend.Seq, j0, j1 int, s backend.MLAShape, scale float32, m, l []float32) {
	if attendFused != 0 {
		b.attendBF16Tiles(out, q, p, layer, seq, j0, j1, s, scale, m, l, attendFused/1000%1000, attendFused%1000)
		return
	}
	H, r := s.Heads, s.Rank
	w, bs := p.width(), p.blockSize
	P := j1 - j0
	bp := getFloats(H*P + 4*H)
	defer floatBufs.put(bp)
	sc, tail := (*bp)[:H*P], (*bp)[H*P:H*P+4*H]
	cache := p.bf16[layer]
	tA := time.Now()
	for j := j0; j < j1; {
		end := min(j1, (j/bs+1)*bs)
		slot := seq.Slot(j, bs)
		rows := cache[slot*w : (slot+end-j)*w]
		n, k := end-j, j-j0
		// The rows stream from memory (a step visits every layer's cache
		// once): the next four rows are requested before the current four
		// are multiplied, the block's first four at its start.
		prefetchRows(b.isa, rows[:min(n, 4)*w])
		i := 0
		for ; i+4 <= n; i += 4 {
			prefetchRows(b.isa, rows[min(n, i+4)*w:min(n, i+8)*w])
			scoresBF16x4(q, w, H, rows[i*w:], w, w, sc[k+i:], P, scale)
		}
		switch {
		case i == n:
		case n >= 4: // the last four rows again: the same scores again, and the new ones
			scoresBF16x4(q, w, H, rows[(n-4)*w:], w, w, sc[k+n-4:], P, scale)
		default: // fewer than four rows: each one as four copies of itself (row stride 0)
			for ; i < n; i++ {
				scoresBF16x4(q, w, H, rows[i*w:(i+1)*w], 0, w, tail, 4, scale)
				for h := 0; h < H; h++ {
					sc[h*P+k+i] = tail[h*4]
				}
			}
		}
		j = end
	}
	tB := time.Now()
	for h := 0; h < H; h++ {
		row := sc[h*P : (h+1)*P]
		m[h] = b.maxF32(row)
		l[h] = b.expF32(row, row, m[h])
	}
	tC := time.Now()
	// The weighted sums of the latents: heads in fours, the latent in
	// panels of 64, each block's rows once per panel and four heads. The
	// first block stores, the others add.
	for j := j0; j < j1; {
		end := min(j1, (j/bs+1)*bs)
		slot := seq.Slot(j, bs)
		rows := cache[slot*w : (slot+end-j)*w]
		k := j - j0
		for db := 0; db < r; db += 64 {
			for h := 0; h < H; h += 4 {
				var alpha []float32
				if j > j0 {
					alpha = ones4[:]
				}
				axpyBF16x4x64(sc[h*P+k:], P, rows[db:], w, end-j, out[h*r+db:], r, alpha)
			}
		}
		j = end
	}
	tD := time.Now()
	phaseNs[0] += tB.Sub(tA).Nanoseconds()
	phaseNs[1] += tC.Sub(tB).Nanoseconds()
	phaseNs[2] += tD.Sub(tC).Nanoseconds()
}

var phaseNs [4]int64

var ones4 = [4]float32{1, 1, 1, 1}

// attendBF16Tiles is attendBF16 in one pass over the rows: tiles of up to
// T rows (within a cache block) get their scores (sub-tiles of S rows per
// four heads), a running softmax step, and their weighted sums while the
// rows are still in the caches; the next tile's lines are prefetched
// during the scores.
func (b *Backend) attendBF16Tiles(out, q []float32, p *pool, layer int, seq *backend.Seq, j0, j1 int, s backend.MLAShape, scale float32, m, l []float32, S, T int) {
	H, r := s.Heads, s.Rank
	w, bs := p.width(), p.blockSize
	bp := getFloats(H*T + 4*H + H)
	defer floatBufs.put(bp)
	sc, tail, alpha := (*bp)[:H*T], (*bp)[H*T:H*T+4*H], (*bp)[H*T+4*H:H*T+5*H]
	for h := 0; h < H; h++ {
		m[h], l[h] = float32(math.Inf(-1)), 0
	}
	cache := p.bf16[layer]
	tile := func(j int) []uint16 {
		n := min(j1, (j/bs+1)*bs, j+T) - j
		slot := seq.Slot(j, bs)
		return cache[slot*w : (slot+n)*w]
	}
	rows := tile(j0)
	subPF := attendFused >= 2000000
	if subPF {
		prefetchRows(b.isa, rows[:min(len(rows), S*w)])
	} else {
		prefetchRows(b.isa, rows)
	}
	for j := j0; j < j1; {
		n := len(rows) / w
		var next []uint16
		if j+n < j1 {
			next = tile(j + n)
		}
		n4 := n &^ 3
		if subPF {
			// The next sub-tile's rows (the next tile's first at the end)
			// are prefetched while the four-head groups score this one.
			for st := 0; st < n4; st += S {
				ns := min(S, n4-st)
				var ahead []uint16
				if st+S < n {
					ahead = rows[(st+S)*w : min(n, st+2*S)*w]
				} else {
					ahead = next[:min(len(next), S*w)]
				}
				share := (len(ahead)/32 + H/4 - 1) / (H / 4) * 32
				for h := 0; h < H; h += 4 {
					pf := ahead[:min(share, len(ahead))]
					ahead = ahead[len(pf):]
					scoresBF16Rows(q[h*w:], w, rows[st*w:], w, ns, w, sc[h*T+st:], T, scale, pf)
				}
			}
		} else {
			calls := (n4 + S - 1) / S * (H / 4)
			share := (len(next)/32 + calls - 1) / max(calls, 1) * 32
			for st := 0; st < n4; st += S {
				ns := min(S, n4-st)
				for h := 0; h < H; h += 4 {
					pf := next[:min(share, len(next))]
					next = next[len(pf):]
					scoresBF16Rows(q[h*w:], w, rows[st*w:], w, ns, w, sc[h*T+st:], T, scale, pf)
				}
			}
		}
		switch {
		case n4 == n:
		case n >= 4:
			scoresBF16x4(q, w, H, rows[(n-4)*w:], w, w, sc[n-4:], T, scale)
		default:
			for i := n4; i < n; i++ {
				scoresBF16x4(q, w, H, rows[i*w:(i+1)*w], 0, w, tail, 4, scale)
				for h := 0; h < H; h++ {
					sc[h*T+i] = tail[h*4]
				}
			}
		}
		softmaxRows(sc, T, H, n, m, l, alpha)
		if attendFused >= 1000000 {
			for h := 0; h < H; h += 4 {
				var a []float32
				if j > j0 {
					a = alpha[h : h+4]
				}
				axpyBF16Panels(sc[h*T:], T, rows, w, n, r/64, out[h*r:], r, a)
			}
		} else {
			for db := 0; db < r; db += 64 {
				for h := 0; h < H; h += 4 {
					var a []float32
					if j > j0 {
						a = alpha[h : h+4]
					}
					axpyBF16x4x64(sc[h*T:], T, rows[db:], w, n, out[h*r+db:], r, a)
				}
			}
		}
		j += n
		if j < j1 {
			rows = tile(j)
		}
	}
}

// SetAttentionVariant is a measurement switch (to be removed).
func SetAttentionVariant(v int) { attendFused = v }
