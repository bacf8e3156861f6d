package cpu

import (
	"math"

	"github.com/mmfp4/mmfp4/backend"
)

// span is a run of consecutive cached positions [j0, j0+n) whose values
// (latent then k_pe, width wide) are rows stride floats apart in data.
type span struct {
	j0, n  int
	data   []float32
	stride int
}

// spans returns positions [j0, j1) of seq in layer as runs of rows: in
// place, one run per cache block, for float32 pools; decoded into buf (one
// run) for the others. buf must hold (j1-j0)*width floats when the pool is
// not float32.
func (b *Backend) spans(p *pool, layer int, seq *backend.Seq, j0, j1 int, buf []float32, out []span) []span {
	w, bs := p.width(), p.blockSize
	out = out[:0]
	if p.dtype == backend.CacheF32 {
		for j := j0; j < j1; {
			end := min(j1, (j/bs+1)*bs)
			slot := seq.Slot(j, bs)
			out = append(out, span{j0: j, n: end - j, data: p.f32[layer][slot*w : (slot+end-j)*w], stride: w})
			j = end
		}
		return out
	}
	for j := j0; j < j1; {
		end := min(j1, (j/bs+1)*bs)
		slot := seq.Slot(j, bs)
		dst := buf[(j-j0)*w : (end-j0)*w]
		if p.dtype == backend.CacheBF16 {
			b.bf16ToF32(dst, p.bf16[layer][slot*w:(slot+end-j)*w])
		} else {
			for i := 0; i < end-j; i++ {
				p.load(layer, slot+i, dst[i*w:(i+1)*w])
			}
		}
		j = end
	}
	return append(out, span{j0: j0, n: j1 - j0, data: buf[:(j1-j0)*w], stride: w})
}

// latentAttentionSIMD is LatentAttention on the SIMD float kernels; it
// reports false for the pure-Go family, which keeps the reference loop.
//
// Sequences with many rows (prefill) take latentAttentionPrefill. The other
// rows are work items of one row, all heads, and a range of its cached
// positions. An item's loops run over the positions four at a time and,
// inside, over the heads, so each cached row is read from memory once per
// item and then reused from the L1 cache by every head: first the scores,
// then their exponentials, then the weighted sum of the latents (a bf16
// cache does all three per tile of rows, attendBF16). With few
// rows (decode) the positions are split over the threads, each range keeps
// its own running maximum and sum, and the ranges are merged at the end.
func (b *Backend) latentAttentionSIMD(om, ql, qm *mat, layer int, s backend.MLAShape, scale float32) bool {
	if b.isa == isaGo {
		return false
	}
	p := b.pool
	var rows []int // rows left to the per-row path
	for i := range b.batch.Seqs {
		seq := &b.batch.Seqs[i]
		if b.latentAttentionPrefill(om, ql, qm, layer, seq, s, scale) {
			continue
		}
		for t := seq.Start; t < seq.Start+seq.Len; t++ {
			rows = append(rows, t)
		}
	}
	if len(rows) == 0 {
		return true
	}
	T, H, r := len(rows), s.Heads, s.Rank
	longest := 0
	for _, t := range rows {
		longest = max(longest, int(b.batch.Positions[t])+1)
	}
	// Positions split into ranges of at least 64 where rows are few. Each
	// range costs a few microseconds (its softmax sums, its share of the
	// merge): fewer than two rows a thread take two ranges a thread (one
	// row on two threads: 4 ranges ran 5-7% faster than 16, docs/perf.md
	// 2026-11-28 (4)); up to eight rows a thread, about eight a thread.
	chunks := 1
	switch {
	case T < 2*b.threads:
		chunks = (2*b.threads + T - 1) / T
	case T < 8*b.threads:
		chunks = 8 * b.threads / T
	}
	chunks = max(1, min(chunks, longest/64))
	// Per (row, chunk): the unnormalised output, and per head the maximum
	// score and the sum of exponentials.
	bp := getFloats(T * chunks * H * (r + 2))
	defer floatBufs.put(bp)
	outs := (*bp)[:T*chunks*H*r]
	ms := (*bp)[T*chunks*H*r : T*chunks*H*(r+1)]
	ls := (*bp)[T*chunks*H*(r+1):]
	// A bf16 pool is read in place, against each row's queries in the
	// kernels' order (qperm), made once per row rather than per item.
	var qperm []float32
	w := r + s.RopeDim
	if p.dtype == backend.CacheBF16 && hasBF16Attention(b.isa, H, r, s.RopeDim) {
		qp := getFloats(T * H * w)
		defer floatBufs.put(qp)
		qperm = (*qp)[:T*H*w]
		for i, t := range rows {
			b.bf16Queries(qperm[i*H*w:(i+1)*H*w], ql.row(t), qm.row(t), s)
		}
	}
	b.workers.run(T*chunks, 1, func(lo, hi int) {
		var sp []span
		for item := lo; item < hi; item++ {
			i, c := item/chunks, item%chunks
			t := rows[i]
			seq := &b.batch.Seqs[b.rowSeq[t]]
			P := int(b.batch.Positions[t]) + 1
			j0, j1 := c*P/chunks, (c+1)*P/chunks
			if j1 == j0 { // a short row's empty range: weight zero when merged
				for h := 0; h < H; h++ {
					ms[item*H+h], ls[item*H+h] = float32(math.Inf(-1)), 0
				}
				clear(outs[item*H*r : (item+1)*H*r])
				continue
			}
			if qperm != nil {
				// The item this thread most likely takes next (items go to
				// the threads in turn): its first rows are prefetched
				// during this one's last tile.
				var after []uint16
				if k := item + b.threads; k < T*chunks {
					t2 := rows[k/chunks]
					P2 := int(b.batch.Positions[t2]) + 1
					c2 := k % chunks
					after = p.bf16Tile(layer, &b.batch.Seqs[b.rowSeq[t2]], c2*P2/chunks, (c2+1)*P2/chunks)
				}
				b.attendBF16(outs[item*H*r:(item+1)*H*r], qperm[i*H*w:(i+1)*H*w], p, layer, seq, j0, j1, s, scale,
					ms[item*H:(item+1)*H], ls[item*H:(item+1)*H], after)
				continue
			}
			var buf *[]float32
			if p.dtype != backend.CacheF32 {
				buf = getFloats((j1 - j0) * p.width())
			}
			var bufData []float32
			if buf != nil {
				bufData = *buf
			}
			sp = b.spans(p, layer, seq, j0, j1, bufData, sp)
			b.attendSpans(outs[item*H*r:(item+1)*H*r], ql.row(t), qm.row(t), sp, j1-j0, s, scale,
				ms[item*H:(item+1)*H], ls[item*H:(item+1)*H])
			if buf != nil {
				floatBufs.put(buf)
			}
		}
	})
	wt := make([]float32, chunks)
	// attendBF16 leaves its sums in even-then-odd order: merged as they
	// are, then put back in column order.
	evenOdd := qperm != nil
	var eo []float32
	if evenOdd {
		eb := getFloats(H * r)
		defer floatBufs.put(eb)
		eo = (*eb)[:H*r]
	}
	for i, t := range rows {
		orow := om.row(t)
		if evenOdd {
			orow = eo
		}
		for h := 0; h < H; h++ {
			m := float32(math.Inf(-1))
			for c := 0; c < chunks; c++ {
				m = max(m, ms[(i*chunks+c)*H+h])
			}
			var l float32
			for c := range wt {
				k := (i*chunks+c)*H + h
				wt[c] = float32(math.Exp(float64(ms[k] - m)))
				l += wt[c] * ls[k]
			}
			out := orow[h*r : (h+1)*r]
			clear(out)
			// Chunk c's output of head h is H*r floats after chunk c-1's.
			first := outs[(i*chunks*H+h)*r:]
			c := 0
			for ; c+4 <= chunks; c += 4 {
				coef := [4]float32{wt[c] / l, wt[c+1] / l, wt[c+2] / l, wt[c+3] / l}
				b.axpy4F32(out, first[c*H*r:], H*r, &coef)
			}
			for ; c < chunks; c++ { // one row as four, three with weight 0
				coef := [4]float32{wt[c] / l}
				b.axpy4F32(out, first[c*H*r:c*H*r+r], 0, &coef)
			}
		}
		if evenOdd {
			interleave32(om.row(t)[:H*r], eo)
		}
	}
	return true
}

// attendSpans computes, for one row (qrow its absorbed queries, qmrow its
// q with the rotary parts) and every head, attention over the P positions
// of sp into out (heads x Rank), unnormalised: each head's maximum score
// goes to m and its sum of exp(score - max) to l.
func (b *Backend) attendSpans(out, qrow, qmrow []float32, sp []span, P int, s backend.MLAShape, scale float32, m, l []float32) {
	H, r, dr, qk := s.Heads, s.Rank, s.RopeDim, s.NopeDim+s.RopeDim
	bp := getFloats(H * P)
	defer floatBufs.put(bp)
	sc := *bp
	fused := hasHeadKernels(b.isa, r, dr) // all heads in one call per 4 positions
	base := sp[0].j0
	var o1, o2 [4]float32
	for _, x := range sp {
		k := x.j0 - base // score column of the span's first position
		i := 0
		for ; i+4 <= x.n; i += 4 {
			rows := x.data[i*x.stride:]
			if fused {
				scoresHx4(qrow, r, qmrow[s.NopeDim:], qk, H, rows, rows[r:], x.stride, r, dr, sc[k+i:], P, scale)
				continue
			}
			for h := 0; h < H; h++ {
				b.dots4F32(qrow[h*r:(h+1)*r], rows, x.stride, &o1)
				b.dots4F32(qmrow[h*qk+s.NopeDim:(h+1)*qk], rows[r:], x.stride, &o2)
				for j := range o1 {
					sc[h*P+k+i+j] = scale * (o1[j] + o2[j])
				}
			}
		}
		for ; i < x.n; i++ {
			row := x.data[i*x.stride : i*x.stride+r+dr]
			for h := 0; h < H; h++ {
				a := b.dotF32(qrow[h*r:(h+1)*r], row[:r])
				c := b.dotF32(qmrow[h*qk+s.NopeDim:(h+1)*qk], row[r:])
				sc[h*P+k+i] = scale * (a + c)
			}
		}
	}

	for h := 0; h < H; h++ {
		row := sc[h*P : (h+1)*P]
		m[h] = b.maxF32(row)
		l[h] = b.expF32(row, row, m[h])
	}
	clear(out)

	// The weighted sum of the latents, heads in blocks of four on the 4x64
	// matrix-product kernel (no horizontal sums; each 64-wide panel of the
	// rows serves every block), the other heads four positions at a time.
	gemmHeads := 0
	if hasSgemm(b.isa) && r%64 == 0 {
		gemmHeads = H &^ 3
		for si, x := range sp {
			k := x.j0 - base
			for db := 0; db < r; db += 64 {
				for h := 0; h < gemmHeads; h += 4 {
					sgemm4x64Acc(sc[h*P+k:], P, x.data[db:], x.stride, x.n, out[h*r+db:], r, si > 0)
				}
			}
		}
		if gemmHeads == H {
			return
		}
	}
	var coef [4]float32
	for _, x := range sp {
		k := x.j0 - base
		i := 0
		for ; i+4 <= x.n; i += 4 {
			rows := x.data[i*x.stride:]
			if fused {
				axpyHx4(out[gemmHeads*r:], H-gemmHeads, rows, r, x.stride, sc[gemmHeads*P+k+i:], P)
				continue
			}
			for h := gemmHeads; h < H; h++ {
				for j := range coef {
					coef[j] = sc[h*P+k+i+j]
				}
				b.axpy4F32(out[h*r:(h+1)*r], rows, x.stride, &coef)
			}
		}
		for ; i < x.n; i++ {
			row := x.data[i*x.stride : i*x.stride+r]
			for h := gemmHeads; h < H; h++ {
				axpy(out[h*r:(h+1)*r], sc[h*P+k+i], row)
			}
		}
	}
}
