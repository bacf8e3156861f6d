package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/internal/benchmode"
	"github.com/mmfp4/mmfp4/server"
)

// levelResult is one concurrency level of serve-bench.
type levelResult struct {
	Streams      int     `json:"streams"`
	Tokens       int     `json:"tokens"`
	Seconds      float64 `json:"seconds"`
	TokPerSec    float64 `json:"tok_per_s"`
	TTFTp50Ms    float64 `json:"ttft_p50_ms"`
	TTFTp99Ms    float64 `json:"ttft_p99_ms"`
	ITLp50Ms     float64 `json:"itl_p50_ms"`
	ITLp99Ms     float64 `json:"itl_p99_ms"`
	FailedStream int     `json:"failed"`
}

func init() {
	var (
		mf       modelFlags
		eo       = &engineFlags{}
		url      string
		levels   string
		promptN  int
		genN     int
		asJSON   bool
		cacheMiB int64
	)
	cmd := &cobra.Command{
		Use:   "serve-bench [-m DIR | --url URL] [--streams 1,4,16,64]",
		Short: "Load the HTTP server with concurrent streams; report aggregate tok/s and p50/p99 time to first token and inter-token latency",
		Long: `Load the HTTP server with concurrent streaming completions and report, per
number of streams, the aggregate generation speed and the p50/p99 time to first
token (TTFT) and inter-token latency (ITL), measured by the client. It serves
the model of -m (default: the built-in demo model) in-process on a loopback
port; with --url it loads a running server instead. Prompts are random token ids (no prefix reuse) and generation ignores
EOS, so every stream produces exactly --gen tokens.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if benchmode.Off() {
				fmt.Fprintln(cmd.OutOrStdout(), "serve-bench: benchmarks are off (ALPHAHENG_TASK_MODE=1)")
				return nil
			}
			var streams []int
			for _, f := range strings.Split(levels, ",") {
				n, err := strconv.Atoi(strings.TrimSpace(f))
				if err != nil || n <= 0 {
					return fmt.Errorf("--streams: %q is not a positive number", f)
				}
				streams = append(streams, n)
			}
			if promptN <= 0 || genN <= 0 {
				return fmt.Errorf("--prompt-tokens and --gen must be positive")
			}
			log := cmd.ErrOrStderr()
			vocab := 0
			if url == "" {
				dir, err := modelDir(mf.dir)
				if err != nil {
					return err
				}
				srv := server.New(server.Config{ModelName: "bench"})
				opts, err := mf.options()
				if err != nil {
					return err
				}
				if c, ok := opts.Backend.(io.Closer); ok {
					defer c.Close() // after the model's; a GPU backend reports its step times there
				}
				if err := eo.apply(&opts, cacheMiB); err != nil {
					return err
				}
				if !cmd.Flags().Changed("max-num-seqs") {
					opts.Engine.MaxNumSeqs = slices.Max(streams)
				}
				opts.Engine.OnStep = srv.OnStep
				m, err := mmfp4.Load(dir, opts)
				if err != nil {
					return err
				}
				defer m.Close()
				// As serve does: no page faults in the first requests.
				if err := m.Prefault(); err != nil {
					return err
				}
				if err := srv.SetModel(m); err != nil {
					return err
				}
				vocab = m.Config().VocabSize
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					return err
				}
				hs := &http.Server{Handler: srv.Handler()}
				go hs.Serve(ln)
				defer hs.Close()
				url = "http://" + ln.Addr().String()
				e, _ := m.Engine()
				o := e.Options()
				fmt.Fprintf(log, "serving %s in-process at %s: %d sequences per step, %d tokens per step, KV cache %d blocks of %d (%v)\n",
					dir, url, o.MaxNumSeqs, o.MaxBatchTokens, o.CacheBlocks, o.BlockSize, o.CacheDType)
			}
			if vocab == 0 {
				vocab = 256 // ids every tokenizer has
			}
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
			// A warm-up at the largest level, not reported (as llama-bench's
			// warm-up run): the server's first steps of a size load kernels
			// and grow step memory. Its prompts are not the levels' own, which
			// would otherwise come from the prefix cache.
			if w := runLevel(client, url, slices.Max(streams), promptN, min(genN, 4), vocab, warmUpSeed); w.FailedStream > 0 {
				fmt.Fprintf(log, "warm-up: %d of %d streams failed\n", w.FailedStream, w.Streams)
			}
			var results []levelResult
			for _, n := range streams {
				r := runLevel(client, url, n, promptN, genN, vocab, 0)
				results = append(results, r)
				if !asJSON {
					fmt.Fprintf(cmd.OutOrStdout(), "%3d streams: %7.1f tok/s aggregate (%d tokens in %.2fs); TTFT p50 %.1f ms p99 %.1f ms; ITL p50 %.1f ms p99 %.1f ms; %d failed\n",
						r.Streams, r.TokPerSec, r.Tokens, r.Seconds, r.TTFTp50Ms, r.TTFTp99Ms, r.ITLp50Ms, r.ITLp99Ms, r.FailedStream)
				}
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(results)
			}
			return nil
		},
	}
	mf.register(cmd)
	cmd.Flags().Lookup("model").Usage = "model directory to serve in-process (default: the built-in demo model)"
	delete(cmd.Flags().Lookup("model").Annotations, cobra.BashCompOneRequiredFlag) // --url needs no model
	eo.register(cmd)
	f := cmd.Flags()
	f.StringVar(&url, "url", "", "base URL of a running server instead of -m")
	f.StringVar(&levels, "streams", "1,4,16,64", "numbers of concurrent streams, comma-separated")
	f.IntVar(&promptN, "prompt-tokens", 64, "prompt length of each stream")
	f.IntVar(&genN, "gen", 32, "tokens generated by each stream")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	f.Int64Var(&cacheMiB, "kv-cache-memory", 0, "memory for the KV cache in MiB (default: 4096 on the CPU, what the weights leave less 4 GiB on a GPU)")
	rootCmd.AddCommand(cmd)
}

// warmUpSeed keeps the warm-up's prompts apart from every level's.
const warmUpSeed = 1 << 32

// runLevel runs n concurrent streams once and measures them; stream i's prompt is drawn from the
// seed (n + seed, i).
func runLevel(client *http.Client, url string, n, promptN, genN, vocab int, seed uint64) levelResult {
	var mu sync.Mutex
	var ttft, itl []float64
	tokens, failed := 0, 0
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(n)+seed, uint64(i)))
			prompt := make([]int, promptN)
			for k := range prompt {
				prompt[k] = r.IntN(vocab)
			}
			t, gaps, count, err := streamOnce(client, url, prompt, genN)
			mu.Lock()
			defer mu.Unlock()
			if err != nil || count != genN {
				failed++
			}
			tokens += count
			if count > 0 {
				ttft = append(ttft, t)
			}
			itl = append(itl, gaps...)
		}()
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	pct := func(v []float64, p float64) float64 {
		if len(v) == 0 {
			return 0
		}
		slices.Sort(v)
		return v[min(len(v)-1, int(p*float64(len(v))))] * 1000
	}
	return levelResult{Streams: n, Tokens: tokens, Seconds: secs, TokPerSec: float64(tokens) / secs,
		TTFTp50Ms: pct(ttft, 0.5), TTFTp99Ms: pct(ttft, 0.99), ITLp50Ms: pct(itl, 0.5), ITLp99Ms: pct(itl, 0.99), FailedStream: failed}
}

// streamOnce sends one streaming completion (with logprobs, so every token
// arrives as its own event) and returns the time to the first token, the
// gaps between tokens, and the token count.
func streamOnce(client *http.Client, url string, prompt []int, genN int) (float64, []float64, int, error) {
	body, _ := json.Marshal(map[string]any{"prompt": prompt, "max_tokens": genN, "stream": true, "temperature": 0,
		"ignore_eos": true, "logprobs": 0})
	start := time.Now()
	resp, err := client.Post(url+"/v1/completions", "application/json", bytes.NewReader(body))
	if err != nil {
		return 0, nil, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, nil, 0, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	var first float64
	var gaps []float64
	var last time.Time
	count := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		var chunk struct {
			Choices []struct {
				Logprobs *struct {
					Tokens []string `json:"tokens"`
				} `json:"logprobs"`
			} `json:"choices"`
		}
		if json.Unmarshal([]byte(data), &chunk) != nil || len(chunk.Choices) == 0 || chunk.Choices[0].Logprobs == nil {
			continue
		}
		now := time.Now()
		for range chunk.Choices[0].Logprobs.Tokens {
			if count == 0 {
				first = now.Sub(start).Seconds()
			} else {
				gaps = append(gaps, now.Sub(last).Seconds())
			}
			last = now
			count++
		}
	}
	return first, gaps, count, sc.Err()
}
