package server

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mmfp4/mmfp4/engine"
)

// metrics are named like vLLM's, with the prefix mmfp4:, so that existing
// dashboards work.
type metrics struct {
	reg                           *prometheus.Registry
	promptTokens, generatedTokens prometheus.Counter
	ttft, itl, e2e                prometheus.Histogram
	stepSeqs, stepTokens          prometheus.Histogram
}

func newMetrics(stats func() (engine.Stats, bool)) *metrics {
	reg := prometheus.NewRegistry()
	m := &metrics{reg: reg}
	stat := func(f func(s engine.Stats) float64) func() float64 {
		return func() float64 {
			s, ok := stats()
			if !ok {
				return 0
			}
			return f(s)
		}
	}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "mmfp4:num_requests_running", Help: "Requests in the running batch."},
			stat(func(s engine.Stats) float64 { return float64(s.Running) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "mmfp4:num_requests_waiting", Help: "Requests waiting for admission."},
			stat(func(s engine.Stats) float64 { return float64(s.Waiting) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "mmfp4:kv_cache_usage_perc", Help: "Fraction of KV cache blocks in use (1 = full)."},
			stat(func(s engine.Stats) float64 {
				if s.Blocks == 0 {
					return 0
				}
				return float64(s.BlocksUsed) / float64(s.Blocks)
			})),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "mmfp4:prefix_cache_queries", Help: "Prompt tokens looked up in the prefix cache."},
			stat(func(s engine.Stats) float64 { return float64(s.PrefixQueries) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "mmfp4:prefix_cache_hits", Help: "Prompt tokens found in the prefix cache."},
			stat(func(s engine.Stats) float64 { return float64(s.PrefixHits) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "mmfp4:num_preemptions_total", Help: "Sequences preempted for lack of KV cache blocks."},
			stat(func(s engine.Stats) float64 { return float64(s.Preemptions) })),
	)
	m.promptTokens = prometheus.NewCounter(prometheus.CounterOpts{Name: "mmfp4:prompt_tokens_total", Help: "Prompt tokens of finished requests."})
	m.generatedTokens = prometheus.NewCounter(prometheus.CounterOpts{Name: "mmfp4:generation_tokens_total", Help: "Generated tokens of finished requests."})
	latency := []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560}
	m.ttft = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mmfp4:time_to_first_token_seconds", Help: "Time from arrival to the first token.", Buckets: latency})
	m.itl = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mmfp4:inter_token_latency_seconds", Help: "Time between consecutive tokens of a request.", Buckets: latency})
	m.e2e = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mmfp4:e2e_request_latency_seconds", Help: "Time from arrival to the end of a request.", Buckets: latency})
	m.stepSeqs = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mmfp4:iteration_sequences", Help: "Sequences per engine step.",
		Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256}})
	m.stepTokens = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mmfp4:iteration_tokens_total", Help: "Tokens per engine step.",
		Buckets: []float64{1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192}})
	reg.MustRegister(m.promptTokens, m.generatedTokens, m.ttft, m.itl, m.e2e, m.stepSeqs, m.stepTokens)
	return m
}

// OnStep records a step; pass it as engine.Options.OnStep.
func (m *metrics) onStep(s engine.StepInfo) {
	m.stepSeqs.Observe(float64(s.Seqs))
	m.stepTokens.Observe(float64(s.Tokens))
}

// token records a token of a sequence that arrived at arrival: the time to
// its first token, or since its last one (kept in *last).
func (m *metrics) token(arrival time.Time, last *time.Time, at time.Time) {
	if last.IsZero() {
		m.ttft.Observe(at.Sub(arrival).Seconds())
	} else {
		m.itl.Observe(at.Sub(*last).Seconds())
	}
	*last = at
}

// finished records a sequence that ended normally: its latency and its
// prompt and generated tokens.
func (m *metrics) finished(arrival time.Time, u engine.Usage) {
	m.e2e.Observe(time.Since(arrival).Seconds())
	m.promptTokens.Add(float64(u.PromptTokens))
	m.generatedTokens.Add(float64(u.CompletionTokens))
}
