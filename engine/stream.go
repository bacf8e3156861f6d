package engine

import (
	"context"
	"io"
	"sync"
	"time"

	"github.com/mmfp4/mmfp4/backend"
)

// Finish says why a sequence ended.
type Finish string

const (
	FinishEOS       Finish = "eos"        // a stop token (EOS) was sampled
	FinishStop      Finish = "stop"       // a stop string appeared in the text
	FinishMaxTokens Finish = "max_tokens" // the request's max_tokens
	FinishContext   Finish = "context"    // the sequence filled max-model-len
	FinishCanceled  Finish = "canceled"   // the request's context ended
	FinishError     Finish = "error"      // see Event.Err
)

// TokenLogprob is a token and its log-probability under the model.
type TokenLogprob = backend.TokenLogprob

// Usage counts a request's tokens.
type Usage struct {
	PromptTokens int
	// CachedTokens of the prompt came from the prefix cache.
	CachedTokens     int
	CompletionTokens int
}

// Event is one step's news for a request: a new token (Done false), or the
// end (Done true), which may still carry text that was held back.
type Event struct {
	Token int    // the new token; unset when Done
	Text  string // text that is now final (with a tokenizer)
	// Logprob of Token and the most likely alternatives, when asked for.
	Logprob     float32
	TopLogprobs []TokenLogprob
	Time        time.Time // when the engine produced the event

	Done   bool
	Finish Finish
	Err    error // with FinishError
	Usage  Usage // on the Done event
}

// Stream delivers a request's events in order. The engine never waits for
// the reader: events queue until they are read.
type Stream struct {
	mu     sync.Mutex
	events []Event
	ended  bool          // the Done event is queued
	wake   chan struct{} // capacity 1: something was queued
	cancel context.CancelFunc
}

func newStream(cancel context.CancelFunc) *Stream {
	return &Stream{wake: make(chan struct{}, 1), cancel: cancel}
}

func (s *Stream) push(ev Event) {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	s.events = append(s.events, ev)
	s.ended = ev.Done
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Recv returns the next event. After the Done event it returns io.EOF.
// It returns ctx's error if ctx ends first.
func (s *Stream) Recv(ctx context.Context) (Event, error) {
	for {
		s.mu.Lock()
		if len(s.events) > 0 {
			ev := s.events[0]
			s.events[0] = Event{}
			s.events = s.events[1:]
			s.mu.Unlock()
			return ev, nil
		}
		ended := s.ended
		s.mu.Unlock()
		if ended {
			return Event{}, io.EOF
		}
		select {
		case <-s.wake:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// Cancel ends the request: the engine frees its sequence and cache blocks
// within one step and sends a Done event with FinishCanceled.
func (s *Stream) Cancel() { s.cancel() }
