package cpu

import (
	"fmt"
	"math"
	"sort"

	"github.com/mmfp4/mmfp4/backend"
)

// routing holds, per token, TopK expert ids and their weights.
type routing struct {
	topK    int
	experts []int
	weights []float32
}

func (r *routing) Tokens() int { return len(r.experts) / max(r.topK, 1) }

// Choice returns token t's experts and weights (for tests and debugging).
func (r *routing) Choice(t int) ([]int, []float32) {
	return r.experts[t*r.topK : (t+1)*r.topK], r.weights[t*r.topK : (t+1)*r.topK]
}

// Route applies the noaux_tc rule to each row of logits.
func (b *Backend) Route(logits backend.Tensor, bias backend.Weight, cfg backend.RouterConfig) backend.Routing {
	lm := asMat(logits)
	bv, ok := b.vector("router bias", bias)
	if !ok || b.badShape("route", [2]int{lm.rows, lm.cols}, [2]int{lm.rows, len(bv)}) ||
		b.badShape("route", [2]int{lm.rows, lm.cols}, [2]int{lm.rows, cfg.NumExperts}) ||
		cfg.TopK <= 0 || cfg.TopK > cfg.NumExperts {
		b.fail("route: top-%d of %d experts", cfg.TopK, cfg.NumExperts)
		return &routing{topK: max(cfg.TopK, 1)}
	}
	r := &routing{topK: cfg.TopK, experts: make([]int, lm.rows*cfg.TopK), weights: make([]float32, lm.rows*cfg.TopK)}
	b.rows(lm.rows, 64*lm.cols, func(t int) {
		SelectExperts(lm.row(t), bv, cfg, r.experts[t*cfg.TopK:(t+1)*cfg.TopK], r.weights[t*cfg.TopK:(t+1)*cfg.TopK])
	})
	b.count(4 * int64(len(bv)))
	if b.onRoute != nil {
		b.onRoute(r.experts)
	}
	return r
}

// SelectExperts is the reference router for one token: scores are
// sigmoid(logits); the choice uses scores + bias, restricted to the best
// TopKGroups groups (a group's worth is the sum of its two best biased
// scores); the weights are the unbiased scores of the chosen experts,
// normalised when NormTopKProb, times RoutedScaling.
func SelectExperts(logits, bias []float32, cfg backend.RouterConfig, ids []int, weights []float32) {
	E := cfg.NumExperts
	scores := make([]float32, E)
	choice := make([]float32, E)
	for e := 0; e < E; e++ {
		scores[e] = float32(1 / (1 + math.Exp(-float64(logits[e]))))
		choice[e] = scores[e] + bias[e]
	}
	if cfg.Groups > 1 {
		per := E / cfg.Groups
		type group struct {
			idx   int
			worth float32
		}
		groups := make([]group, cfg.Groups)
		for g := range groups {
			m1, m2 := float32(math.Inf(-1)), float32(math.Inf(-1))
			for _, v := range choice[g*per : (g+1)*per] {
				if v > m1 {
					m1, m2 = v, m1
				} else if v > m2 {
					m2 = v
				}
			}
			groups[g] = group{g, m1 + m2}
		}
		sort.SliceStable(groups, func(i, j int) bool { return groups[i].worth > groups[j].worth })
		for _, g := range groups[cfg.TopKGroups:] {
			for e := g.idx * per; e < (g.idx+1)*per; e++ {
				choice[e] = float32(math.Inf(-1))
			}
		}
	}
	order := make([]int, E)
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(i, j int) bool { return choice[order[i]] > choice[order[j]] })
	var sum float32
	for k := 0; k < cfg.TopK; k++ {
		ids[k] = order[k]
		weights[k] = scores[order[k]]
		sum += weights[k]
	}
	for k := range weights {
		if cfg.NormTopKProb {
			weights[k] /= sum + 1e-20
		}
		weights[k] *= cfg.RoutedScaling
	}
}

// MoE runs each chosen expert on the tokens routed to it and adds the
// weighted outputs to dst.
func (b *Backend) MoE(dst, x backend.Tensor, r backend.Routing, experts []backend.Expert) {
	b.MoEShared(dst, x, r, experts, nil)
}

// MoEShared is MoE plus each shared expert's SwiGLU block, added to dst
// after the routed experts (backend.SharedMoE). Small batches run the
// shared experts inside the fused MoE's two dispatches, so their weights
// stream with the routed ones; otherwise it is MoE, then each block.
func (b *Backend) MoEShared(dst, x backend.Tensor, r backend.Routing, experts, shared []backend.Expert) {
	d, xm := asMat(dst), asMat(x)
	rt, ok := r.(*routing)
	if !ok {
		panic(fmt.Sprintf("cpu backend: routing of type %T from another backend", r))
	}
	if b.badShape("moe", [2]int{d.rows, d.cols}, [2]int{xm.rows, xm.cols}) ||
		b.badShape("moe routing", [2]int{rt.Tokens(), 1}, [2]int{xm.rows, 1}) {
		return
	}
	if b.moeFused(d, xm, rt, experts, shared) {
		return
	}
	b.moeByExpert(d, xm, rt, experts)
	for _, s := range shared {
		b.Add(dst, dst, backend.RunExpert(b, x, s))
	}
}

// moeByExpert runs each chosen expert once on all the tokens routed to it,
// so its weights are read once per batch.
func (b *Backend) moeByExpert(d, xm *mat, rt *routing, experts []backend.Expert) {
	type use struct {
		token  int
		weight float32
	}
	byExpert := make([][]use, len(experts))
	for t := 0; t < xm.rows; t++ {
		ids, ws := rt.Choice(t)
		for k, e := range ids {
			if e >= len(experts) {
				b.fail("moe: expert %d of %d", e, len(experts))
				return
			}
			byExpert[e] = append(byExpert[e], use{t, ws[k]})
		}
	}
	// The int8 path quantizes the tokens once for every expert's gate and
	// up products, rather than twice per expert.
	var acts *qacts
	for e, ex := range experts {
		if len(byExpert[e]) == 0 {
			continue
		}
		if g, ok := ex.Gate.(*quant); ok && !b.floatActs && g.m.K == xm.cols {
			acts = b.quantizeActivations(xm, g.m.GroupSize)
			defer acts.release()
		}
		break
	}
	// The experts' inputs and outputs are temporaries of this op: they come
	// from one pooled buffer rather than the step's arena, which keeps
	// every tensor of every layer until the next step.
	most, inter := 0, 0
	for e, uses := range byExpert {
		if len(uses) > 0 {
			most, inter = max(most, len(uses)), max(inter, experts[e].Gate.Rows())
		}
	}
	bp := getFloats(most * (2*xm.cols + 2*inter))
	defer floatBufs.put(bp)
	scratch := *bp
	view := func(off, rows, cols int) *mat {
		s := scratch[off : off+rows*cols]
		clear(s)
		return &mat{rows: rows, cols: cols, stride: cols, data: s}
	}
	for e, uses := range byExpert {
		if len(uses) == 0 {
			continue
		}
		ex := experts[e]
		inter := ex.Gate.Rows()
		gate, up := view(most*xm.cols, len(uses), inter), view(most*(xm.cols+inter), len(uses), inter)
		gq, ok1 := ex.Gate.(*quant)
		uq, ok2 := ex.Up.(*quant)
		if acts != nil && ok1 && ok2 && gq.m.GroupSize == acts.g && uq.m.GroupSize == acts.g &&
			gq.m.K == xm.cols && uq.m.K == xm.cols && uq.m.N == inter {
			tokens := make([]int, len(uses))
			for i, u := range uses {
				tokens[i] = u.token
			}
			a := acts.gather(tokens)
			b.count(weightBytes(gq) + weightBytes(uq))
			b.matMulQuantActs(gate, a, gq.m)
			b.matMulQuantActs(up, a, uq.m)
			a.release()
		} else {
			in := view(0, len(uses), xm.cols)
			for i, u := range uses {
				copy(in.row(i), xm.row(u.token))
			}
			b.MatMul(gate, in, ex.Gate)
			b.MatMul(up, in, ex.Up)
		}
		b.SwiGLU(gate, gate, up)
		out := view(most*(xm.cols+2*inter), len(uses), xm.cols)
		b.MatMul(out, gate, ex.Down)
		for i, u := range uses {
			axpy(d.row(u.token), u.weight, out.row(i))
		}
	}
}
