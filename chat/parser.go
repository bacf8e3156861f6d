package chat

import (
	"encoding/json"
	"math/rand/v2"
	"strings"
)

// The tags of the GLM-4.x output format.
const (
	ThinkOpen  = "<think>"
	ThinkClose = "</think>"
	CallOpen   = "<tool_call>"
	CallClose  = "</tool_call>"
	KeyOpen    = "<arg_key>"
	KeyClose   = "</arg_key>"
	ValueOpen  = "<arg_value>"
	ValueClose = "</arg_value>"
)

// Bounds on a tool call's name and argument keys; longer text is not a
// call.
const (
	maxNameLen = 256
	maxKeyLen  = 256
)

// EventKind says what an Event carries.
type EventKind uint8

const (
	ReasoningText EventKind = iota + 1 // Text is reasoning
	ContentText                        // Text is answer content
	ToolCallStart                      // a call begins: Index, ID, Name
	ToolCallArgs                       // Text is the next piece of call Index's JSON arguments
	ToolCallEnd                        // call Index is complete
)

// Event is one piece of parsed model output. The ToolCallArgs pieces of a
// call, concatenated, are a JSON object.
type Event struct {
	Kind  EventKind
	Text  string
	Index int    // the tool call's position in the response
	ID    string // ToolCallStart
	Name  string // ToolCallStart
}

// ParserOptions set up a Parser.
type ParserOptions struct {
	// Reasoning is true when the prompt ends inside <think> (see
	// EndsInThinking): the output starts as reasoning.
	Reasoning bool
	// Tools are the callable tools. With none, <tool_call> is plain text.
	// A call of a name not listed is not a call either.
	Tools []Tool
	// NewID makes tool call ids; nil gives "call_" and 24 random letters.
	NewID func() string
}

// Parser reads GLM-4.x output incrementally: reasoning up to </think>,
// then content, and tool calls
// <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>
// (a newline may follow the name and each element, as GLM-4.5/4.6 write
// them). Feed it text in pieces of any size; the events it returns depend
// only on the text, not on how it was cut.
//
// Text is held back only while it may be the start of a tag, with three
// exceptions inherent to the format: a call's name waits for the tag that
// follows it, an argument value that is not a string waits for its end
// (it must be parsed), and an </arg_value> waits for the tag after it
// (see below).
//
// Decisions, in order of how often they matter:
//   - Tool calls are recognised in reasoning as in content; the text
//     around a call keeps its channel. A <tool_call> before </think> is a
//     call (the tokenizer has <tool_call> as one special token, so the
//     model means it), and the reasoning goes on after it until </think>.
//   - String-typed arguments (by the tool's JSON schema) stay raw and are
//     streamed as they come; others are parsed as JSON, and kept as a JSON
//     string when they do not parse.
//   - </arg_value> ends a value only when the next thing (after
//     whitespace) is <arg_key> or </tool_call>, so a value may contain the
//     text </arg_value>.
//   - A call whose name is not a known tool, or whose text does not follow
//     the format before its first argument, is plain text, tags and all.
//     A call that breaks later (or is cut off by the end of the output) is
//     closed with the arguments complete so far, and the rest of its text
//     comes out as plain text: nothing the model wrote is dropped.
//   - Whitespace at the start of the reasoning, of the content, and after
//     a call is dropped, as the chat template drops it from history.
//   - <think> opens reasoning only as the very first thing of the output;
//     elsewhere <think> and a stray </think> in content are plain text.
type Parser struct {
	opt      ParserOptions
	tools    map[string]map[string]bool // tool name -> argument key -> string-typed
	buf      string                     // text not yet consumed
	state    parseState
	thinking bool // the text channel is reasoning
	segStart bool // nothing emitted since the channel (re)started
	begun    bool // anything at all seen (for <think> at the start)
	call     callState
	calls    int
	out      []Event
}

type parseState uint8

const (
	inText     parseState = iota
	inName                // after <tool_call>
	inBetween             // expecting <arg_key> or </tool_call>
	inKey                 // after <arg_key>
	inAfterKey            // expecting <arg_value>
	inValue               // after <arg_value>
)

// callState is the tool call being read.
type callState struct {
	index  int
	name   string
	nargs  int             // arguments emitted
	key    string          // the current argument's key
	stream bool            // the current value is a string being streamed
	value  strings.Builder // a non-string value so far
	// raw is the text consumed since the last argument was emitted; if
	// the call breaks, it comes back as plain text.
	raw strings.Builder
}

// NewParser starts a parser.
func NewParser(opt ParserOptions) *Parser {
	p := &Parser{opt: opt, thinking: opt.Reasoning, segStart: true}
	if len(opt.Tools) > 0 {
		p.tools = map[string]map[string]bool{}
		for _, t := range opt.Tools {
			p.tools[t.Name] = t.stringArgs()
		}
	}
	if p.opt.NewID == nil {
		p.opt.NewID = randomCallID
	}
	return p
}

// randomCallID is an OpenAI-style tool call id.
func randomCallID() string {
	const letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := []byte("call_")
	for range 24 {
		b = append(b, letters[rand.IntN(len(letters))])
	}
	return string(b)
}

// Feed parses the next piece of output and returns the events it
// completes.
func (p *Parser) Feed(piece string) []Event {
	p.buf += piece
	for p.step(false) {
	}
	return p.take()
}

// Finish ends the output: what was held back is decided, and an open call
// is closed.
func (p *Parser) Finish() []Event {
	for p.step(true) {
	}
	return p.take()
}

func (p *Parser) take() []Event {
	out := p.out
	p.out = nil
	return out
}

// held is how many bytes are waiting for more text (for tests).
func (p *Parser) held() int { return len(p.buf) }

// emit appends an event, merging text with the previous event of the same
// kind and call.
func (p *Parser) emit(ev Event) {
	if n := len(p.out); n > 0 && (ev.Kind == ReasoningText || ev.Kind == ContentText || ev.Kind == ToolCallArgs) {
		last := &p.out[n-1]
		if last.Kind == ev.Kind && last.Index == ev.Index {
			last.Text += ev.Text
			return
		}
	}
	p.out = append(p.out, ev)
}

// text emits s in the current channel, dropping leading whitespace of a
// segment.
func (p *Parser) text(s string) {
	if s == "" {
		return
	}
	if p.segStart {
		s = strings.TrimLeft(s, whitespace)
		if s == "" {
			return
		}
		p.segStart = false
	}
	p.begun = true
	kind := ContentText
	if p.thinking {
		kind = ReasoningText
	}
	p.emit(Event{Kind: kind, Text: s})
}

func (p *Parser) args(s string) {
	p.emit(Event{Kind: ToolCallArgs, Index: p.call.index, Text: s})
}

const whitespace = " \t\r\n"

// step consumes what it can of buf in the current state and reports
// whether it changed anything (so that the caller goes on).
func (p *Parser) step(eof bool) bool {
	switch p.state {
	case inText:
		return p.stepText(eof)
	case inName:
		return p.stepName(eof)
	case inBetween:
		return p.stepBetween(eof)
	case inKey:
		return p.stepKey(eof)
	case inAfterKey:
		return p.stepAfterKey(eof)
	default:
		return p.stepValue(eof)
	}
}

// textTags are the tags that end plain text in the current channel.
func (p *Parser) textTags() []string {
	var tags []string
	if p.thinking {
		tags = append(tags, ThinkClose)
	} else if !p.begun {
		tags = append(tags, ThinkOpen)
	}
	if p.tools != nil {
		tags = append(tags, CallOpen)
	}
	return tags
}

func (p *Parser) stepText(eof bool) bool {
	if p.buf == "" {
		return false
	}
	tags := p.textTags()
	i, tag := firstTag(p.buf, tags)
	if i < 0 {
		n := len(p.buf)
		if !eof {
			n -= tagPrefixSuffix(p.buf, tags)
		}
		p.text(p.buf[:n])
		p.buf = p.buf[n:]
		return false
	}
	if tag == ThinkOpen && strings.TrimLeft(p.buf[:i], whitespace) != "" {
		// Not the first thing of the output: plain text from here on.
		p.text(p.buf[:i])
		p.buf = p.buf[i:]
		return true
	}
	p.text(p.buf[:i])
	p.buf = p.buf[i+len(tag):]
	p.begun = true
	switch tag {
	case ThinkClose:
		p.thinking, p.segStart = false, true
	case ThinkOpen:
		p.thinking, p.segStart = true, true
	case CallOpen:
		p.state = inName
		p.call = callState{index: p.calls}
		p.call.raw.WriteString(CallOpen)
	}
	return true
}

// notCall turns a call that broke before its name was accepted back into
// text: the <tool_call> tag is emitted as text and the rest is scanned
// again as text.
func (p *Parser) notCall() bool {
	p.state = inText
	p.text(CallOpen)
	return true
}

func (p *Parser) stepName(eof bool) bool {
	t := strings.TrimLeft(p.buf, whitespace)
	j := strings.IndexAny(t, "<"+whitespace)
	if j < 0 {
		if !validName(t, true) || eof {
			return p.notCall()
		}
		return false
	}
	name := t[:j]
	if !validName(name, false) {
		return p.notCall()
	}
	if _, ok := p.tools[name]; !ok {
		return p.notCall()
	}
	r := strings.TrimLeft(t[j:], whitespace)
	switch {
	case strings.HasPrefix(r, KeyOpen), strings.HasPrefix(r, CallClose):
	case !eof && (strings.HasPrefix(KeyOpen, r) || strings.HasPrefix(CallClose, r)):
		return false // wait for the tag
	default:
		return p.notCall()
	}
	// The call is accepted: from here on it is a call, whatever follows.
	p.call.name = name
	p.calls++
	p.emit(Event{Kind: ToolCallStart, Index: p.call.index, ID: p.opt.NewID(), Name: name})
	p.call.raw.Reset()
	p.call.raw.WriteString(p.buf[:len(p.buf)-len(r)])
	p.buf = r
	p.state = inBetween
	return true
}

// validName reports whether s can be a function name; with partial, s
// may be a prefix of one (and may be empty).
func validName(s string, partial bool) bool {
	if len(s) > maxNameLen || (!partial && s == "") {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.' || c == ':') {
			return false
		}
	}
	return true
}

// endCall closes the open call: the arguments so far form its JSON
// object.
func (p *Parser) endCall() {
	if p.call.nargs == 0 {
		p.args("{}")
	} else {
		p.args("}")
	}
	p.emit(Event{Kind: ToolCallEnd, Index: p.call.index})
	p.state = inText
	p.segStart = true
}

// breakCall ends a call whose text broke off: the call keeps the
// arguments complete so far, and the text of the incomplete element comes
// back as plain text. The unconsumed buf is scanned as text again.
func (p *Parser) breakCall() bool {
	if p.state == inValue && p.call.stream {
		p.args(`"`)
	}
	raw := p.call.raw.String()
	p.endCall()
	p.text(raw)
	return true
}

func (p *Parser) stepBetween(eof bool) bool {
	r := strings.TrimLeft(p.buf, whitespace)
	p.call.raw.WriteString(p.buf[:len(p.buf)-len(r)])
	p.buf = r
	switch {
	case strings.HasPrefix(r, CallClose):
		p.buf = r[len(CallClose):]
		p.endCall()
		return true
	case strings.HasPrefix(r, KeyOpen):
		p.buf = r[len(KeyOpen):]
		p.call.raw.WriteString(KeyOpen)
		p.state = inKey
		return true
	case !eof && (strings.HasPrefix(KeyOpen, r) || strings.HasPrefix(CallClose, r)):
		return false
	default:
		return p.breakCall()
	}
}

func (p *Parser) stepKey(eof bool) bool {
	i := strings.IndexByte(p.buf, '<')
	if i < 0 {
		if len(p.buf) > maxKeyLen || eof {
			return p.breakCall()
		}
		return false
	}
	rest := p.buf[i:]
	switch {
	case strings.HasPrefix(rest, KeyClose):
		key := strings.TrimSpace(p.buf[:i])
		if key == "" || len(key) > maxKeyLen {
			return p.breakCall()
		}
		p.call.key = key
		p.call.raw.WriteString(p.buf[:i+len(KeyClose)])
		p.buf = rest[len(KeyClose):]
		p.state = inAfterKey
		return true
	case !eof && strings.HasPrefix(KeyClose, rest):
		return false
	default:
		return p.breakCall()
	}
}

func (p *Parser) stepAfterKey(eof bool) bool {
	r := strings.TrimLeft(p.buf, whitespace)
	switch {
	case strings.HasPrefix(r, ValueOpen):
		p.call.raw.WriteString(p.buf[:len(p.buf)-len(r)+len(ValueOpen)])
		p.buf = r[len(ValueOpen):]
		p.state = inValue
		p.call.value.Reset()
		p.call.stream = p.tools[p.call.name][p.call.key]
		if p.call.stream {
			// A string value is streamed from here on: the argument is
			// emitted and belongs to the call even if the text breaks.
			p.args(p.argPrefix() + `"`)
			p.call.nargs++
			p.call.raw.Reset()
		}
		return true
	case !eof && strings.HasPrefix(ValueOpen, r):
		return false
	default:
		return p.breakCall()
	}
}

// argPrefix is what goes before the current argument's value: the brace
// or comma, and the key.
func (p *Parser) argPrefix() string {
	var b strings.Builder
	if p.call.nargs == 0 {
		b.WriteByte('{')
	} else {
		b.WriteByte(',')
	}
	writeJSONString(&b, p.call.key)
	b.WriteByte(':')
	return b.String()
}

func (p *Parser) stepValue(eof bool) bool {
	end, safe := valueEnd(p.buf, eof)
	if end < 0 {
		p.valueText(p.buf[:safe])
		p.buf = p.buf[safe:]
		if eof {
			return p.breakCall()
		}
		return false
	}
	p.valueText(p.buf[:end])
	p.buf = p.buf[end+len(ValueClose):]
	if p.call.stream {
		p.args(`"`)
	} else {
		p.args(p.argPrefix() + jsonArgument(p.call.value.String()))
		p.call.nargs++
	}
	p.call.raw.Reset()
	p.state = inBetween
	return true
}

// valueText takes the next part of the current value.
func (p *Parser) valueText(s string) {
	if s == "" {
		return
	}
	if p.call.stream {
		var b strings.Builder
		writeJSONStringBody(&b, s)
		p.args(b.String())
		return
	}
	p.call.value.WriteString(s)
	p.call.raw.WriteString(s)
}

// valueEnd finds the </arg_value> that ends the value at the start of s:
// one followed (after whitespace) by <arg_key> or </tool_call>. It returns
// its index, or -1 and how much of s surely belongs to the value. At eof
// an </arg_value> followed by nothing but whitespace ends the value too.
func valueEnd(s string, eof bool) (end, safe int) {
	from := 0
	for {
		i := strings.Index(s[from:], ValueClose)
		if i < 0 {
			if eof {
				return -1, len(s)
			}
			return -1, len(s) - tagPrefixSuffix(s[from:], []string{ValueClose})
		}
		i += from
		rest := strings.TrimLeft(s[i+len(ValueClose):], whitespace)
		switch {
		case strings.HasPrefix(rest, KeyOpen), strings.HasPrefix(rest, CallClose):
			return i, i
		case rest == "" && eof:
			return i, i
		case !eof && (strings.HasPrefix(KeyOpen, rest) || strings.HasPrefix(CallClose, rest)):
			return -1, i // undecided: wait
		}
		from = i + 1 // this </arg_value> is part of the value
	}
}

// jsonArgument turns a non-string argument's text into JSON: the text
// itself when it is JSON, else the text as a JSON string.
func jsonArgument(raw string) string {
	t := strings.TrimSpace(raw)
	if json.Valid([]byte(t)) {
		var b strings.Builder
		compactJSON(&b, t)
		return b.String()
	}
	var b strings.Builder
	writeJSONString(&b, raw)
	return b.String()
}

// firstTag finds the earliest of tags in s.
func firstTag(s string, tags []string) (int, string) {
	best, which := -1, ""
	for _, t := range tags {
		if i := strings.Index(s, t); i >= 0 && (best < 0 || i < best) {
			best, which = i, t
		}
	}
	return best, which
}

// tagPrefixSuffix is the length of the longest suffix of s that is a
// proper prefix of one of tags: text that may still become a tag.
func tagPrefixSuffix(s string, tags []string) int {
	keep := 0
	for _, t := range tags {
		for n := min(len(t)-1, len(s)); n > keep; n-- {
			if strings.HasSuffix(s, t[:n]) {
				keep = n
				break
			}
		}
	}
	return keep
}
