// Package server is the OpenAI-compatible HTTP API over the engine:
// /v1/chat/completions and /v1/completions (streaming and not), the
// Anthropic Messages API (/v1/messages),
// /v1/models, /tokenize, /detokenize, /health and /metrics. It is plain
// net/http; a request's context is its sequence's context, so a client
// that goes away frees its sequence and cache blocks within one step.
package server

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/constrain"
	"github.com/mmfp4/mmfp4/engine"
)

// Config sets up a Server.
type Config struct {
	// ModelName is the id clients use in "model" (and /v1/models lists).
	ModelName string
	// APIKey, if set, is required as "Authorization: Bearer KEY" (or
	// "x-api-key: KEY") on every endpoint but /health.
	APIKey string
	// CORSOrigins are the browser origins allowed to call the API; none by
	// default. "*" allows any.
	CORSOrigins []string
	// MaxBodyBytes limits a request body (default 8 MiB).
	MaxBodyBytes int64
	// MaxN is the most choices per request (default 8).
	MaxN int
}

// Server serves one model. It answers /health with 503 until SetModel.
type Server struct {
	cfg     Config
	model   atomic.Pointer[mmfp4.Model]
	eng     atomic.Pointer[engine.Engine]
	drain   atomic.Bool
	metrics *metrics
	created int64
	keyHash [32]byte
	// grammars are the compiled output constraints, shared by requests.
	grammars *constrain.Cache
	// replay, set only by tests, stands in for the engine: it returns the
	// events a request's stream delivers.
	replay func(engine.Request) []engine.Event
}

// New returns a server with no model yet.
func New(cfg Config) *Server {
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 8 << 20
	}
	if cfg.MaxN <= 0 {
		cfg.MaxN = 8
	}
	if cfg.ModelName == "" {
		cfg.ModelName = "mmfp4"
	}
	s := &Server{cfg: cfg, created: time.Now().Unix(), keyHash: sha256.Sum256([]byte(cfg.APIKey)),
		grammars: constrain.NewCache(64)}
	s.metrics = newMetrics(func() (engine.Stats, bool) {
		e := s.eng.Load()
		if e == nil {
			return engine.Stats{}, false
		}
		return e.Stats(), true
	})
	return s
}

// OnStep feeds the step metrics; set it as the engine's Options.OnStep.
func (s *Server) OnStep(info engine.StepInfo) { s.metrics.onStep(info) }

// SetModel makes the server ready: it starts the model's engine.
func (s *Server) SetModel(m *mmfp4.Model) error {
	e, err := m.Engine()
	if err != nil {
		return err
	}
	s.eng.Store(e)
	s.model.Store(m)
	return nil
}

// Drain makes /health answer 503 and new generation requests fail with
// 503, while running ones go on (for a graceful shutdown).
func (s *Server) Drain() {
	s.drain.Store(true)
	if e := s.eng.Load(); e != nil {
		e.StopAdmissions()
	}
}

// Handler routes the API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", s.health)
	mux.HandleFunc("GET /v1/models", s.auth(s.models))
	mux.HandleFunc("POST /v1/chat/completions", s.auth(s.chat))
	mux.HandleFunc("POST /v1/completions", s.auth(s.completions))
	mux.HandleFunc("POST /v1/messages", s.authAs(s.messages, anthropicError))
	mux.HandleFunc("POST /v1/messages/count_tokens", s.authAs(s.countTokens, anthropicError))
	mux.HandleFunc("POST /tokenize", s.auth(s.tokenize))
	mux.HandleFunc("POST /detokenize", s.auth(s.detokenize))
	mux.Handle("GET /metrics", s.auth(promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}).ServeHTTP))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		e := &apiError{Status: http.StatusNotFound, Message: fmt.Sprintf("no route for %s %s", r.Method, r.URL.Path), Type: "invalid_request_error"}
		if strings.HasPrefix(r.URL.Path, "/v1/messages") {
			anthropicError(w, e)
			return
		}
		writeError(w, e)
	})
	return s.cors(mux)
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	if s.model.Load() == nil || s.drain.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// auth checks the API key in constant time (of the key's hash, so the
// comparison does not reveal the key's length either), and answers a
// failure in the OpenAI error shape.
func (s *Server) auth(h http.HandlerFunc) http.HandlerFunc { return s.authAs(h, writeError) }

// authAs is auth with the error written by fail (the Anthropic routes
// answer in Anthropic's shape).
func (s *Server) authAs(h http.HandlerFunc, fail func(http.ResponseWriter, *apiError)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.cfg.APIKey != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if k := r.Header.Get("X-Api-Key"); !ok && k != "" {
				got, ok = k, true // Anthropic clients send the key this way
			}
			sum := sha256.Sum256([]byte(got))
			if !ok || subtle.ConstantTimeCompare(sum[:], s.keyHash[:]) != 1 {
				fail(w, &apiError{Status: http.StatusUnauthorized, Message: "missing or incorrect API key (Authorization: Bearer KEY, or x-api-key: KEY)",
					Type: "invalid_request_error", Code: strp("invalid_api_key")})
				return
			}
		}
		h(w, r)
	}
}

// cors answers browsers from the configured origins only.
func (s *Server) cors(h http.Handler) http.Handler {
	if len(s.cfg.CORSOrigins) == 0 {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		origin := r.Header.Get("Origin")
		if origin != "" && (slices.Contains(s.cfg.CORSOrigins, "*") || slices.Contains(s.cfg.CORSOrigins, origin)) {
			w.Header().Set("Access-Control-Allow-Origin", origin)
			w.Header().Add("Vary", "Origin")
			if r.Method == http.MethodOptions {
				w.Header().Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
				w.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type")
				w.WriteHeader(http.StatusNoContent)
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, e *apiError) {
	if e.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(e.RetryAfter))
	}
	writeJSON(w, e.Status, map[string]*apiError{"error": e})
}

// ready returns the model and engine, or the 503 to send.
func (s *Server) ready() (*mmfp4.Model, *engine.Engine, *apiError) {
	m, e := s.model.Load(), s.eng.Load()
	if m == nil || e == nil {
		return nil, nil, &apiError{Status: http.StatusServiceUnavailable, Message: "the model is still loading", Type: "service_unavailable", RetryAfter: 5}
	}
	return m, e, nil
}

// readBody reads a request body within the size limit.
func (s *Server) readBody(w http.ResponseWriter, r *http.Request) ([]byte, *apiError) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes))
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		return nil, &apiError{Status: http.StatusRequestEntityTooLarge, Message: fmt.Sprintf("the request body is larger than %d bytes", s.cfg.MaxBodyBytes), Type: "invalid_request_error"}
	case err != nil:
		return nil, badRequest("", "reading the request body: %v", err)
	}
	return body, nil
}

// checkModel accepts the served model's name (or none).
func (s *Server) checkModel(name string) *apiError {
	if name != "" && name != s.cfg.ModelName {
		return &apiError{Status: http.StatusNotFound, Message: fmt.Sprintf("the model %q does not exist; this server serves %q", name, s.cfg.ModelName),
			Type: "invalid_request_error", Param: strp("model"), Code: strp("model_not_found")}
	}
	return nil
}

func (s *Server) models(w http.ResponseWriter, r *http.Request) {
	m, _, aerr := s.ready()
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": []map[string]any{{
		"id": s.cfg.ModelName, "object": "model", "created": s.created, "owned_by": "mmfp4", "max_model_len": m.MaxContext(),
	}}})
}

// fingerprint identifies the serving configuration in responses.
func (s *Server) fingerprint(e *engine.Engine) string {
	o := e.Options()
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s|%v|%d", s.cfg.ModelName, o.CacheDType, o.BlockSize)))
	return "fp_mmfp4_" + hex.EncodeToString(sum[:4])
}

func newID(prefix string) string {
	var b [12]byte
	rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}
