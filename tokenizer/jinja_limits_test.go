package tokenizer

import (
	"strings"
	"testing"
	"time"

	"github.com/ardanlabs/jinja"
)

// renderLimitedSrc compiles and renders src with no variables.
func renderLimitedSrc(src string, lim renderLimits) (string, error) {
	ct, err := compileChatTemplate(src)
	if err != nil {
		return "", err
	}
	return ct.renderLimited(map[string]jinja.Value{}, lim)
}

// TestHostileTemplatesFail: templates that would exhaust memory, overflow
// the stack or run for ever fail with an error that says which bound they
// hit. Those that fail only after building up to a limit run under
// smaller limits (small), to keep the test quick; the mechanism is the
// same.
func TestHostileTemplatesFail(t *testing.T) {
	const built = "a chat template may build at most"
	small := defaultRenderLimits
	small.size = 1 << 20
	small.held = 4 << 20
	small.items = 10_000
	small.steps = 10_000
	cases := []struct {
		name, src, want string
		small           bool
	}{
		{"string repeat", `{{ "x" * 100000000000 }}`, "repeated 100000000000 times", false},
		{"repeat from the left", `{{ 100000000000 * "xy" }}`, "repeated 100000000000 times", false},
		{"list repeat", `{{ [1, 2] * 100000000000 }}`, "repeated 100000000000 times", false},
		{"self-recursive macro", `{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}`, "macro calls nested more than 100 deep", false},
		{"mutually recursive macros", `{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n + 1) }}{% endmacro %}{{ a(0) }}`, "nested more than 100 deep", false},
		{"huge range", `{{ range(10**12) | length }}`, "range of 1000000000000 items", false},
		{"huge range loop", `{% for i in range(10 ** 12) %}{% endfor %}`, "range of 1000000000000 items", false},
		{"nested loops", `{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}`, "more than 10000 loop iterations", true},
		{"output size", `{% for i in range(10000) %}{{ "x" * 1000 }}{% endfor %}`, "output is longer than 1048576 bytes", true},
		{"doubling with ~", `{% set ns = namespace(s="x") %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}`, built, true},
		{"doubling with +", `{% set ns = namespace(l=["x" * 1000]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}`, built, true},
		{"doubling lists", `{% set ns = namespace(l="xxxx") %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}`, built, true},
		{"format doubling", `{% set ns = namespace(s="{0}{0}") %}{% for i in range(64) %}{% set ns.s = ns.s.format(ns.s) %}{% endfor %}`, built, true},
		{"printing shared parts", `{% set a = ["x" * 1000000] * 60 %}{% set b = [a, a] %}`, built, false},
		{"replace growth", `{{ ("x" * 1000000) | replace("x", "y" * 1000) }}`, built, false},
		{"join growth", `{{ (["x" * 100000] * 10) | join("y" * 100000) }}`, built, true},
		{"indent width", `{{ "a\nb" | indent(10 ** 12) }}`, "an indent of", false},
		{"tojson indent", `{{ [[[[1]]]] | tojson(indent=100000000) }}`, "tojson: output longer than", false},
		{"many variables", `{% set a = "x" * 1000000 %}{% set b = a ~ "y" %}{% set c = b ~ "z" %}{% set d = c ~ "" %}{% set e = d ~ "" %}`, "variables hold more than 4194304 bytes", true},
		{"values kept by recursion", `{% macro f(n) %}{% set s = "x" * 1000000 %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}`, "variables hold more than 4194304 bytes", true},
		{"loop over characters", `{% for c in "x" * 20000 %}{% endfor %}`, "20000 items or more", true},
		{"list of characters", `{{ ("x" * 20000) | list | length }}`, "20000 items or more", true},
		{"join of characters", `{{ ("x" * 20000) | join(",") }}`, "20000 items or more", true},
		{"split into many", `{{ ("a," * 20000).split(",") | length }}`, "20001 items or more", true},
		{"split on whitespace", `{{ ("a " * 20000).split() | length }}`, "10001 items or more", true},
		{"long list", `{{ [1] * 20000 }}`, "lists of at most 10000 items", true},
		{"long list by +", `{% set l = [1] * 10000 %}{{ (l + l) | length }}`, "20000 items or more", true},
		{"deep value", `{% set ns = namespace(l=[]) %}{% for i in range(2000) %}{% set ns.l = [ns.l] %}{% endfor %}`, "nested more than 1000 deep", false},
		{"list holding itself", `{% set l = [] %}{% set _ = l.append(l) %}{{ l }}`, "access to attribute 'append' of 'list' object is unsafe", false},
		{"namespace holding itself", `{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}`, "a namespace cannot hold itself", false},
		{"namespaces holding each other", `{% set a = namespace() %}{% set b = namespace(a=a) %}{% set a.b = b %}{{ a }}`, "a namespace cannot hold itself", false},
		{"integer overflow", `{{ 10 ** 30 }}`, "does not fit in 64 bits", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			lim := defaultRenderLimits
			if c.small {
				lim = small
			}
			out, err := renderLimitedSrc(c.src, lim)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %d bytes, error %v; want an error containing %q", len(out), err, c.want)
			}
		})
	}
}

// TestHostileTemplatesRejected: sources the engine would parse with
// unbounded recursion, and our own function names, fail to compile.
func TestHostileTemplatesRejected(t *testing.T) {
	cases := []struct{ name, src, want string }{
		{"deep brackets", "{{ " + strings.Repeat("(", 5000) + "1" + strings.Repeat(")", 5000) + " }}", "nested more than 100 deep"},
		{"deep lists", "{{ " + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + " }}", "nested more than 100 deep"},
		{"deep unary", "{{ " + strings.Repeat("-", 5000) + "1 }}", "nested more than 100 deep"},
		{"deep not", "{{ " + strings.Repeat("not ", 5000) + "1 }}", "nested more than 100 deep"},
		{"deep blocks", strings.Repeat("{% if true %}", 200) + strings.Repeat("{% endif %}", 200), "blocks nested more than 100 deep"},
		{"reserved name", "{{ mmfp4_leave() }}", "reserved"},
		{"reserved filter", "{{ 1 | mmfp4_str }}", "reserved"},
		{"reserved set", "{% set mmfp4_tick = 1 %}", "reserved"},
		{"huge integer", "{{ 123456789012345678901234567890 }}", "too large"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := compileChatTemplate(c.src)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
		})
	}
}

// TestRenderLimits: each limit stops a template that passes the others.
func TestRenderLimits(t *testing.T) {
	lim := defaultRenderLimits
	lim.steps = 1000
	if _, err := renderLimitedSrc(`{% for i in range(40) %}{% for j in range(40) %}{% endfor %}{% endfor %}`, lim); err == nil || !strings.Contains(err.Error(), "more than 1000 loop iterations") {
		t.Errorf("steps: %v", err)
	}
	if _, err := renderLimitedSrc(`{% for i in range(30) %}{% for j in range(30) %}{% endfor %}{% endfor %}`, lim); err != nil {
		t.Errorf("930 steps under a limit of 1000: %v", err)
	}
	lim = defaultRenderLimits
	lim.timeout = time.Nanosecond // over before the first iteration is checked
	if _, err := renderLimitedSrc(`{% for i in range(3) %}{{ i }}{% endfor %}`, lim); err == nil || !strings.Contains(err.Error(), "took longer than 1ns") {
		t.Errorf("timeout: %v", err)
	}
	lim = defaultRenderLimits
	lim.size = 100
	if _, err := renderLimitedSrc(`{% for i in range(11) %}0123456789{% endfor %}`, lim); err == nil || !strings.Contains(err.Error(), "longer than 100 bytes") {
		t.Errorf("text output: %v", err)
	}
	if out, err := renderLimitedSrc(`{% for i in range(10) %}0123456789{% endfor %}`, lim); err != nil || len(out) != 100 {
		t.Errorf("100 bytes under a limit of 100: %d %v", len(out), err)
	}
	lim = defaultRenderLimits
	lim.held = 3 << 20
	reassign := `{% set ns = namespace(s="") %}{% for i in range(10) %}{% set s = "x" * 1000000 %}{% set ns.s = s %}{% endfor %}`
	if _, err := renderLimitedSrc(reassign, lim); err != nil {
		t.Errorf("a variable set again replaces its last value: %v", err)
	}
	if _, err := renderLimitedSrc(reassign+`{% set t = "y" * 1000000 %}{% set u = t ~ "" %}`, lim); err == nil || !strings.Contains(err.Error(), "hold more than 3145728 bytes") {
		t.Errorf("held: %v", err)
	}
	lim = defaultRenderLimits
	lim.depth = 5
	rec := `{% macro r(n) %}{% if n > 0 %}{{ r(n - 1) }}{% endif %}{% endmacro %}`
	if _, err := renderLimitedSrc(rec+`{{ r(5) }}`, lim); err == nil || !strings.Contains(err.Error(), "nested more than 5 deep") {
		t.Errorf("depth: %v", err)
	}
	if _, err := renderLimitedSrc(rec+`{{ r(4) }}{{ r(4) }}`, lim); err != nil {
		t.Errorf("depth 5 twice under a limit of 5: %v", err)
	}
}

// TestTemplateEnginePanicIsAnError: whatever the engine does wrong comes
// back as an error, with the template line.
func TestTemplateEnginePanicIsAnError(t *testing.T) {
	ct, err := compileChatTemplate("x\n{{ f() }}")
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]jinja.Value{"f": jinja.NewCallable("f", func([]jinja.Value, map[string]jinja.Value) (jinja.Value, error) {
		panic("boom")
	})}
	if _, err := ct.render(vars); err == nil || !strings.Contains(err.Error(), "line 2") || !strings.Contains(err.Error(), "boom") {
		t.Errorf("error %v", err)
	}
}
