package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ardanlabs/jinja"
)

// renderWith compiles src as a chat template and renders it with the
// variables of a JSON object.
func renderWith(t *testing.T, src string, ctx json.RawMessage) (string, error) {
	t.Helper()
	ct, err := compileChatTemplate(src)
	if err != nil {
		return "", err
	}
	vars := map[string]jinja.Value{}
	if len(ctx) > 0 {
		v, err := valueFromJSON(ctx)
		if err != nil {
			t.Fatal(err)
		}
		d := v.AsDict()
		for _, k := range d.OrderedKeys() {
			vars[k], _ = d.Get(k)
		}
	}
	return ct.render(vars)
}

// TestJinjaFixtures renders small templates that probe the engine and
// compares them with what transformers' Jinja environment made.
func TestJinjaFixtures(t *testing.T) {
	checkJinjaFixtures(t, "jinja.json", knownJinjaGaps)
}

// TestJinjaMoreFixtures: the operators, methods and filters that the
// translation routes through our functions, and sandbox errors.
func TestJinjaMoreFixtures(t *testing.T) {
	checkJinjaFixtures(t, "jinja_more.json", nil)
}

func checkJinjaFixtures(t *testing.T, file string, gaps map[int]jinjaGap) {
	data, err := os.ReadFile(filepath.Join(fixtureDir, file))
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Cases []struct {
			Template string          `json:"template"`
			Context  json.RawMessage `json:"context"`
			Output   *string         `json:"output"`
			Error    string          `json:"error"`
		} `json:"cases"`
	}
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	for i, c := range f.Cases {
		got, err := renderWith(t, c.Template, c.Context)
		if gap, ok := gaps[i]; ok {
			// A gap fails when its output changes: a fix (then remove it
			// here) or a regression.
			if err != nil {
				got = "<error>"
			}
			if got != gap.output {
				t.Errorf("%s case %d (known gap: %s): got %q, the gap gives %q and jinja2 %q", file, i, gap.reason, got, gap.output, deref(c.Output))
			}
			if got == deref(c.Output) {
				t.Errorf("%s case %d (known gap: %s) now matches jinja2: remove it from the known gaps", file, i, gap.reason)
			}
			continue
		}
		switch {
		case c.Output == nil && err == nil:
			t.Errorf("%s case %d %q: want an error like %q, got %q", file, i, c.Template, c.Error, got)
		case c.Output != nil && (err != nil || got != *c.Output):
			t.Errorf("%s case %d %q:\n got %q %v\nwant %q", file, i, c.Template, got, err, *c.Output)
		}
	}
}

type jinjaGap struct{ reason, output string }

// knownJinjaGaps are fixture cases where the engine still differs from
// jinja2, by index in jinja.json, with the reason and what it renders
// ("<error>" for an error).
var knownJinjaGaps = map[int]jinjaGap{
	29: {"an attribute of an undefined value is undefined, not an error", ""},
	32: {"pairs print as lists, not tuples", "[['a', 1], ['b', 2]]|[['b', 2], ['a', 1]]|['b', 'a']|[2, 1]"},
	42: {"strings and dicts are not sequences", "147|[1, 2, 3]|True|False|False"},
}

func deref(s *string) string {
	if s == nil {
		return "<error>"
	}
	return *s
}

func TestTemplateErrorNamesLine(t *testing.T) {
	src := "{% for m in messages %}\n{{ m.content }}\n{% if m.role == 'bad' %}\n{{ raise_exception('bad role') }}\n{% endif %}\n{% endfor %}"
	_, err := renderWith(t, src, json.RawMessage(`{"messages": [{"role": "user", "content": "x"}, {"role": "bad", "content": "y"}]}`))
	if err == nil || !strings.Contains(err.Error(), "line 4") || !strings.Contains(err.Error(), "bad role") {
		t.Fatalf("error = %v, want it to name line 4 and the message", err)
	}
}

func TestGenerationTagsAreTransparent(t *testing.T) {
	src := "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}"
	got, err := renderWith(t, src, json.RawMessage(`{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}`))
	if err != nil || got != "q|a|" {
		t.Fatalf("got %q %v", got, err)
	}
}
