package sample

import (
	"math/bits"
	"slices"
)

// better is the strict total order used for ranking: higher logit first,
// lower id first among equal logits.
func better(logits []float32, a, b int32) bool {
	la, lb := logits[a], logits[b]
	return la > lb || (la == lb && a < b)
}

// sortDesc sorts ids best first.
func sortDesc(ids []int32, logits []float32) {
	if len(ids) <= 12 {
		insertionSort(ids, logits)
		return
	}
	slices.SortFunc(ids, func(a, b int32) int {
		if better(logits, a, b) {
			return -1
		}
		if better(logits, b, a) {
			return 1
		}
		return 0
	})
}

func insertionSort(ids []int32, logits []float32) {
	for i := 1; i < len(ids); i++ {
		v := ids[i]
		j := i
		for j > 0 && better(logits, v, ids[j-1]) {
			ids[j] = ids[j-1]
			j--
		}
		ids[j] = v
	}
}

// selectTop rearranges ids so that ids[:k] holds the k best ids (in no
// particular order) and every id in ids[k:] ranks below all of them.
// It is a quickselect with median-of-three pivots that falls back to a
// full sort of the remaining range if partitioning keeps going badly, so
// it runs in O(n) on average and O(n log n) at worst.
func selectTop(ids []int32, k int, logits []float32) {
	if k <= 0 || k >= len(ids) {
		return
	}
	lo, hi := 0, len(ids)
	budget := 2 * bits.Len(uint(len(ids)))
	for hi-lo > 12 {
		if budget == 0 {
			sortDesc(ids[lo:hi], logits)
			return
		}
		budget--
		p := partition(ids[lo:hi], logits) + lo
		switch {
		case p == k || p+1 == k:
			return
		case k < p:
			hi = p
		default:
			lo = p + 1
		}
	}
	insertionSort(ids[lo:hi], logits)
}

// partition splits ids around a median-of-three pivot and returns the
// pivot's final position: ids before it rank above it, ids after it below.
func partition(ids []int32, logits []float32) int {
	last := len(ids) - 1
	mid := last / 2
	// Order ids[0], ids[mid], ids[last] so the median lands in ids[mid].
	if better(logits, ids[mid], ids[0]) {
		ids[0], ids[mid] = ids[mid], ids[0]
	}
	if better(logits, ids[last], ids[mid]) {
		ids[mid], ids[last] = ids[last], ids[mid]
		if better(logits, ids[mid], ids[0]) {
			ids[0], ids[mid] = ids[mid], ids[0]
		}
	}
	ids[mid], ids[last] = ids[last], ids[mid]
	pivot := ids[last]
	pv := logits[pivot]

	// Hoare-style scan; keys are distinct under the total order.
	i, j := 0, last-1
	for {
		for i <= j && (logits[ids[i]] > pv || (logits[ids[i]] == pv && ids[i] < pivot)) {
			i++
		}
		for j >= i && (logits[ids[j]] < pv || (logits[ids[j]] == pv && ids[j] > pivot)) {
			j--
		}
		if i >= j {
			break
		}
		ids[i], ids[j] = ids[j], ids[i]
		i++
		j--
	}
	ids[i], ids[last] = ids[last], ids[i]
	return i
}

// topKHeap fills dst with the len(dst) best token ids of logits (in no
// particular order), scanning the vocabulary once in id order. dst is kept
// as a min-heap whose root is the worst id chosen so far, so most tokens
// cost a single comparison. len(dst) must be in [1, len(logits)].
func topKHeap(dst []int32, logits []float32) {
	k := len(dst)
	for i := range dst {
		dst[i] = int32(i)
		siftUp(dst, i, logits)
	}
	rootV := logits[dst[0]]
	for i := k; i < len(logits); i++ {
		// Ids arrive in increasing order, so an equal logit never beats
		// the root under the lowest-id tie-break.
		if v := logits[i]; v > rootV {
			dst[0] = int32(i)
			siftDown(dst, logits)
			rootV = logits[dst[0]]
		}
	}
}

// siftUp restores the heap (worst at the root) after h[i] was set.
func siftUp(h []int32, i int, logits []float32) {
	for i > 0 {
		parent := (i - 1) / 2
		if !better(logits, h[parent], h[i]) {
			return
		}
		h[parent], h[i] = h[i], h[parent]
		i = parent
	}
}

// siftDown restores the heap (worst at the root) after h[0] was replaced.
func siftDown(h []int32, logits []float32) {
	i, n := 0, len(h)
	for {
		c := 2*i + 1
		if c >= n {
			return
		}
		if c+1 < n && better(logits, h[c], h[c+1]) {
			c++ // the worse child
		}
		if !better(logits, h[i], h[c]) {
			return
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
}

// nucleus returns the smallest prefix of cand, in rank order, whose weight
// sum reaches target, rearranging cand so that this prefix comes first (in
// no particular order). It is a quickselect that carries the weight of
// everything known to rank above the current range, so it needs O(n) work
// on average instead of a full sort.
func nucleus(cand []int32, logits []float32, w []float64, target float64) []int32 {
	lo, hi := 0, len(cand)
	var acc float64 // weight of cand[:lo]
	budget := 2*bits.Len(uint(len(cand))) + 4
	for hi-lo > 12 && budget > 0 {
		budget--
		p := partition(cand[lo:hi], logits) + lo
		s := acc
		for _, id := range cand[lo:p] {
			s += w[id]
		}
		if s >= target {
			hi = p
			continue
		}
		s += w[cand[p]]
		if s >= target {
			return cand[:p+1]
		}
		acc, lo = s, p+1
	}
	sortDesc(cand[lo:hi], logits)
	for j := lo; j < hi; j++ {
		acc += w[cand[j]]
		if acc >= target {
			return cand[:j+1]
		}
	}
	// Only rounding gets here: cand[:hi] is known to reach target (or is
	// everything).
	return cand[:hi]
}
