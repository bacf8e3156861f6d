package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/server"
)

func init() {
	var (
		mf       modelFlags
		host     string
		port     int
		name     string
		apiKey   string
		cors     []string
		cacheMiB int64
		grace    time.Duration
		eo       = &engineFlags{}
	)
	cmd := &cobra.Command{
		Use:   "serve -m DIR [--host 127.0.0.1] [--port 8000]",
		Short: "Serve the model over an OpenAI-compatible HTTP API",
		Long: `Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions,
/v1/completions, /v1/models, /tokenize, /detokenize, /health and /metrics.
It listens on 127.0.0.1 only unless --host says otherwise.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if port < 0 || port > 65535 {
				return fmt.Errorf("--port %d: want 0 to 65535", port)
			}
			if name == "" && mf.dir != "" {
				name = filepath.Base(filepath.Clean(mf.dir))
			}
			if name == "" || name == "." || name == string(filepath.Separator) {
				name = "mmfp4"
			}
			if apiKey == "" {
				apiKey = os.Getenv("MMFP4_API_KEY")
			}
			srv := server.New(server.Config{ModelName: name, APIKey: apiKey, CORSOrigins: cors})
			opts, err := mf.options()
			if err != nil {
				return err
			}
			if err := eo.apply(&opts, cacheMiB); err != nil {
				return err
			}
			opts.Engine.OnStep = srv.OnStep

			ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
			if err != nil {
				return err
			}
			hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second}
			served := make(chan error, 1)
			go func() { served <- hs.Serve(ln) }()
			log := cmd.ErrOrStderr()
			fmt.Fprintf(log, "listening on http://%s (model %q loading; /health answers 503 until it is ready)\n", ln.Addr(), name)

			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			type loaded struct {
				m   *mmfp4.Model
				err error
			}
			ready := make(chan loaded, 1)
			go func() {
				var m *mmfp4.Model
				dir, err := modelDir(mf.dir)
				if err == nil {
					m, err = mmfp4.Load(dir, opts)
				}
				if err == nil {
					// The first requests should not pay a page fault per
					// page of weights: map them all before answering 200.
					err = m.Prefault()
				}
				if err == nil {
					err = srv.SetModel(m)
				}
				ready <- loaded{m, err}
			}()
			var m *mmfp4.Model
			select {
			case l := <-ready:
				if l.err != nil {
					hs.Close()
					return l.err
				}
				m = l.m
				e, _ := m.Engine()
				eopt := e.Options()
				fmt.Fprintf(log, "ready: model %q in %.1fs; context %d tokens, KV cache %d blocks of %d tokens (%v), up to %d sequences\n",
					name, m.LoadTime.Seconds(), m.MaxContext(), eopt.CacheBlocks, eopt.BlockSize, eopt.CacheDType, eopt.MaxNumSeqs)
			case <-ctx.Done():
				hs.Close()
				return errors.New("interrupted while loading the model")
			case err := <-served:
				return err
			}
			select {
			case <-ctx.Done():
			case err := <-served:
				m.Close()
				return err
			}
			stop() // a second signal kills the process
			fmt.Fprintf(log, "shutting down: no new requests; waiting up to %s for running ones\n", grace)
			srv.Drain()
			sctx, cancel := context.WithTimeout(context.Background(), grace)
			defer cancel()
			if err := hs.Shutdown(sctx); err != nil {
				fmt.Fprintln(log, "grace period over: cancelling the remaining requests")
				m.Close()
				hs.Close()
			}
			m.Close()
			return nil
		},
	}
	mf.register(cmd)
	f := cmd.Flags()
	f.StringVar(&host, "host", "127.0.0.1", "address to listen on (0.0.0.0 serves other machines)")
	f.IntVar(&port, "port", 8000, "TCP port")
	f.StringVar(&name, "served-model-name", "", "model id in the API (default: the model directory's name)")
	f.StringVar(&apiKey, "api-key", "", "require this key as 'Authorization: Bearer KEY' (default: $MMFP4_API_KEY; none if empty)")
	f.StringSliceVar(&cors, "cors-origin", nil, "browser origins allowed to call the API (CORS is off by default; * allows any)")
	f.DurationVar(&grace, "shutdown-timeout", 30*time.Second, "on SIGINT/SIGTERM, how long running requests may take before they are cancelled")
	f.IntVar(&mf.ctx, "max-model-len", 0, "most tokens of one sequence, prompt and output (same as --ctx; default: the model's maximum, or what the KV cache holds)")
	f.Int64Var(&cacheMiB, "kv-cache-memory", 0, "memory for the KV cache in MiB (default: 4096 on the CPU, what the weights leave less 4 GiB on a GPU; never more than --max-num-seqs full sequences)")
	eo.register(cmd)
	rootCmd.AddCommand(cmd)
}

// engineFlags are the batching engine's bounds.
type engineFlags struct {
	maxNumSeqs, maxBatchTokens, maxQueue, blockSize int
}

func (e *engineFlags) register(c *cobra.Command) {
	f := c.Flags()
	f.IntVar(&e.maxNumSeqs, "max-num-seqs", 0, "most sequences decoded together in one step (0: 64 on a GPU, 16 on the CPU)")
	f.IntVar(&e.maxBatchTokens, "max-batch-tokens", 0, "most tokens in one step; longer prompts are prefilled in chunks (0: 2048 on a GPU, 512 on the CPU)")
	f.IntVar(&e.maxQueue, "max-queue", 256, "most requests waiting for a slot; past it requests get 429")
	f.IntVar(&e.blockSize, "block-size", 64, "tokens per KV cache block")
}

func (e *engineFlags) apply(o *mmfp4.Options, cacheMiB int64) error {
	for _, v := range []struct {
		name     string
		val, min int
	}{{"--max-num-seqs", e.maxNumSeqs, 0}, {"--max-batch-tokens", e.maxBatchTokens, 0}, {"--max-queue", e.maxQueue, 1}, {"--block-size", e.blockSize, 1}} {
		switch {
		case v.val < v.min && v.min == 0:
			return fmt.Errorf("%s %d: want a positive number, or 0 for the device's default", v.name, v.val)
		case v.val < v.min:
			return fmt.Errorf("%s %d: want a positive number", v.name, v.val)
		}
	}
	if cacheMiB < 0 {
		return fmt.Errorf("--kv-cache-memory %d: want a positive number of MiB", cacheMiB)
	}
	o.Engine.MaxNumSeqs, o.Engine.MaxBatchTokens, o.Engine.MaxQueue, o.Engine.BlockSize = e.maxNumSeqs, e.maxBatchTokens, e.maxQueue, e.blockSize
	o.Engine.CacheBytes = cacheMiB << 20
	return nil
}
