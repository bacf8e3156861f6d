#!/usr/bin/env python3
"""Records what Hugging Face tokenizers/transformers make of our test inputs.

Reads every tokenizer directory under testdata/tokenizers/ (fetched by
tools/fetch_tokenizers.sh) plus testdata/tokenizer/glm/, and writes one
JSON file per tokenizer into OUTDIR (default testdata/tokenizer/):

  cases:  text -> ids of encode(text, add_special_tokens=False) and =True
          by the tokenizers library (tokenizer.json as written), and the
          decoded text of both; hf_* fields where transformers differs.
  chats:  message lists -> apply_chat_template(..., tokenize=False) text,
          for tokenizers that carry a chat template.

It also writes jinja.json: small templates rendered by the same Jinja
environment that transformers uses for chat templates, to check the Go
template engine feature by feature.

It also writes jinja_more.json: more such templates, for the
translation of expressions and the bounds on rendering. With
--jinja-only it writes only the two jinja files, with plain jinja2 set up
as transformers does when transformers is not installed (it renders every
case of jinja.json the same).

Needs transformers and tokenizers (but for --jinja-only); runs offline.
Usage: python3 tools/tokenizer_fixtures.py [--jinja-only] [OUTDIR]
"""
import glob
import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

JINJA_ONLY = "--jinja-only" in sys.argv
if not JINJA_ONLY:
    import tokenizers  # noqa: E402
    import transformers  # noqa: E402
    from transformers import AutoTokenizer  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

LONG = (
    "In 2024, the team shipped v3.2.1 of their engine — 40% faster than v2! "
    "Benchmarks ran on 8×H100 (80 GB each) at 1,234,567 tokens/s. "
    "Les résultats étaient impressionnants; 東京のチームも参加した。 "
    "The code `for i in range(10): print(i**2)` prints squares.\n\n"
    "Q: Isn't it great?\tA: It's GREAT!!! 🎉🚀 Naïve café façade, coöperate, ½ ≠ 0.5.\r\n"
    "Emails like alice@example.com and URLs like https://example.org/a?b=c&d=e#f "
    "are common; so are paths like /usr/local/bin and C:\\Windows\\System32.    \n"
    "Multiple   spaces,\ttabs\t\tand\nnewlines\n\n\nall appear.  Done."
)

TEXTS = {
    "english": "Hello, world! This is a simple English sentence about the quick brown fox.",
    "code": "def f(x):\n\tif x  >  1:\n\t\treturn    x * 2\n    else:\n        return 0\n\n\n# end\n",
    "cjk": "日本語のテキストと中文文本，还有한국어 텍스트。漢字かな交じり文",
    "emoji_zwj": "Family: 👨‍👩‍👧‍👦, flags 🇯🇵🇺🇸, skin 👍🏽 and ❤️‍🔥! 🧑🏿‍💻",
    "combining": "e\u0301 vs \u00e9, A\u030a, n\u0303o, Z\u0351\u0352algo, \u1e9b\u0323, \uac00 \u1100\u1161",
    "compat": "ﬁne ① ＡＢＣ ㍿ x² ℌ",
    "digits": "1234567890 3.14159 1,000,000 and 12345678901234567890 (٣٤٥ ४५६)",
    "contractions": "I'm sure you'll see they've done it; it's what we'd do. DON'T SHOUT, I'LL",
    "leading_ws": "   leading spaces",
    "trailing_ws": "trailing spaces   ",
    "only_ws": "   \t\n  \n\n",
    "single_space": " ",
    "newlines": "\n\n\n",
    "crlf": "line one\r\nline two\r\n",
    "empty": "",
    "mixed_case": "HelloWorld CamelCase iPhone URLParser XMLHttpRequest",
    "scripts": "مرحبا بالعالم नमस्ते दुनिया Привет, мир! Γειά σου κόσμε",
    "rare": "𠜎𠜱𝄞 \u0000\u0001\u007f \u00a0\u2028\ufeff",
    "punct": "Hello!!! ... ??? --- *** (a) [b] {c} <d> \"e\" 'f'",
    "long_mixed": LONG,
}


def special_texts(tok):
    """Texts with the tokenizer's own special and added tokens written in."""
    added = sorted(tok.get_added_vocab().items(), key=lambda kv: kv[1])
    specials = [t for t, _ in added]
    picks = specials[:2] + specials[-2:]
    out = {}
    if picks:
        a, b = picks[0], picks[-1]
        out["special_tokens"] = f"{a}Hello{b} world {a}\n{b}  x"
        out["special_only"] = "".join(picks)
        out["special_adjacent_spaces"] = f" {picks[1 % len(picks)]} text {picks[2 % len(picks)]} "
    if tok.eos_token:
        out["eos_in_text"] = f"The end.{tok.eos_token}"
    if tok.bos_token:
        out["bos_in_text"] = f"{tok.bos_token}Start here"
    # Added tokens that are not special (Qwen's <tool_call>, DeepSeek's <｜User｜>).
    nonspecial = [t for t in specials if t not in set(tok.all_special_tokens)]
    if nonspecial:
        out["added_nonspecial"] = " ".join(nonspecial[:3]) + " plain"
    return out


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city. Température & \"quotes\" <ok>",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7.5},
        }, "required": ["city"]},
    }},
    {"type": "function", "function": {
        "name": "search",
        "description": "Search the web",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    }},
]

SYS = {"role": "system", "content": "You are a helpful assistant."}


def chats():
    """Message lists; each names the tokenizers it applies to (None: all)."""
    c = []
    c.append(("basic", None, [SYS, {"role": "user", "content": "Hello! How are you?"}], {}))
    c.append(("no_system", None, [{"role": "user", "content": "Tell me a joke."}], {}))
    c.append(("multi_turn", None, [
        SYS,
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 is 4."},
        {"role": "user", "content": "And 3+3?"},
    ], {}))
    c.append(("unicode_ws", None, [
        {"role": "user", "content": "  héllo 世界 👋\n\tindented\n  "},
        {"role": "assistant", "content": " Ünïcödé reply.  "},
        {"role": "user", "content": "<b>tags</b> & \"quotes\""},
    ], {}))
    c.append(("think_history", ["qwen3", "glm"], [
        {"role": "user", "content": "Solve x+1=2"},
        {"role": "assistant", "content": "<think>\nx = 2-1\n</think>\n\nx = 1"},
        {"role": "user", "content": "Thanks! Now x+2=5?"},
    ], {}))
    c.append(("think_last", ["qwen3", "glm"], [
        {"role": "user", "content": "Solve x+1=2"},
        {"role": "assistant", "content": "<think>\nx = 2-1\n</think>\n\nx = 1"},
    ], {}))
    c.append(("reasoning_content", ["qwen3", "glm"], [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering.", "reasoning_content": "Short wavelengths scatter more."},
    ], {}))
    for et in (True, False):
        c.append((f"thinking_{str(et).lower()}", ["qwen3", "glm"], [SYS, {"role": "user", "content": "Hi"}],
                  {"enable_thinking": et}))
    dict_args = [
        SYS,
        {"role": "user", "content": "What's the weather in Paris and Tokyo?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京", "days": 2}}},
        ]},
        {"role": "tool", "content": "{\"temperature\": 22}"},
        {"role": "tool", "content": "{\"temperature\": 18}"},
        {"role": "assistant", "content": "Paris: 22°C, Tokyo: 18°C."},
        {"role": "user", "content": "Thanks"},
    ]
    c.append(("tools", ["qwen3", "glm"], dict_args, {"tools": TOOLS}))
    c.append(("tool_calls_no_tools", ["qwen3", "glm"], dict_args, {}))
    c.append(("tool_call_empty_content", ["qwen3", "glm"], [
        {"role": "user", "content": "Search for cats"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": "{\"q\": \"cats\"}"}}]},
        {"role": "tool", "content": "Cats are small."},
    ], {"tools": TOOLS}))
    c.append(("tools_deepseek", ["deepseek_v3"], [
        SYS,
        {"role": "user", "content": "What's the weather in Paris and Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Tokyo\"}"}},
        ]},
        {"role": "tool", "content": "{\"temperature\": 22}"},
        {"role": "tool", "content": "{\"temperature\": 18}"},
        {"role": "assistant", "content": "Paris: 22°C, Tokyo: 18°C."},
        {"role": "user", "content": "Thanks"},
    ], {"tools": TOOLS}))
    c.append(("tool_last_deepseek", ["deepseek_v3"], [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "sunny"},
    ], {}))
    c.append(("two_systems", ["deepseek_v3", "qwen3", "glm"], [
        SYS, {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
    ], {}))
    return c


def jinja_cases():
    """(template, context) pairs that probe the engine itself."""
    d = {"b": 1, "a": [1, 2.5, "x", None, True], "c": {"z": "é<&>'\"\n\t\u0001", "y": 1e20, "x": 0.1}}
    msgs = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}]
    T = [
        ("{{ none }}|{{ true }}|{{ false }}|{{ 1.0 }}|{{ 1.5e10 }}|{{ 3 }}", {}),
        ("{{ [1, 'a', none, true, 2.0] }}|{{ {'k': 'v', 'n': 1} }}", {}),
        ("{{ 10 / 4 }}|{{ 7 // 2 }}|{{ 7 % 3 }}|{{ 2 ** 10 }}|{{ -3 }}|{{ 1 + 2 * 3 }}", {}),
        ("{{ 'abc'[1:] }}|{{ 'abcdef'[::-1] }}|{{ 'abc'[-1] }}|{{ [1,2,3][1:] }}", {}),
        ("{{ d | tojson }}", {"d": d}),
        ("{{ d | tojson(indent=2) }}", {"d": d}),
        ("{{ d.c | tojson(ensure_ascii=False) }}", {"d": d}),
        ("{{ d | tojson(separators=(',', ':')) }}", {"d": d}),
        ("{{ 'a,b,,c'.split(',') }}|{{ 'a b  c'.split() }}|{{ 'a-b-c'.split('-', 1) }}", {}),
        ("[{{ ' x\n'.strip() }}][{{ 'xxhixx'.strip('x') }}][{{ '\n\nhi\n'.lstrip('\n') }}][{{ 'hi  '.rstrip() }}]", {}),
        ("{{ 'Hello' ~ 1 ~ none }}|{{ 'a' + 'b' }}|{{ 'ab' * 3 }}", {}),
        ("{% for x in [1,2,3,4,5] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
        ("{% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.first }}{{ loop.last }}{{ loop.length }},{% endfor %}", {}),
        ("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{% for k in d %}{{ k }}{% endfor %}", {"d": {"z": 1, "a": 2, "m": 3}}),
        ("{% set ns = namespace(n=0, s='') %}{% for m in msgs %}{% set ns.n = ns.n + 1 %}{% set ns.s = ns.s ~ m.role[0] %}{% endfor %}{{ ns.n }} {{ ns.s }}", {"msgs": msgs}),
        ("{% set x = 1 %}{% for i in [1,2] %}{% set x = x + i %}{% endfor %}{{ x }}", {}),
        ("{% macro greet(name, punct='!') -%}Hi {{ name }}{{ punct }}{%- endmacro %}{{ greet('A') }} {{ greet('B', '?') }} {{ greet(name='C') }}", {}),
        ("{{ s | trim }}|{{ s | length }}|{{ s | upper }}|{{ s | lower }}|{{ 'hello world' | title }}|{{ 'hello' | capitalize }}", {"s": "  MiXed Case  "}),
        ("{{ x is string }} {{ x is mapping }} {{ x is iterable }} {{ y is string }} {{ y is mapping }} {{ y is iterable }} {{ z is none }} {{ w is defined }} {{ z is defined }} {{ n is number }} {{ n is integer }} {{ f is float }}",
         {"x": "s", "y": {"a": 1}, "z": None, "n": 3, "f": 1.5}),
        ("{{ msgs | selectattr('role', 'equalto', 'user') | list | length }}|{{ msgs | map(attribute='role') | join(',') }}|{{ msgs | rejectattr('role', 'eq', 'user') | map(attribute='content') | first }}", {"msgs": msgs}),
        ("{{ undefined_var }}|{{ d.missing }}|{{ d['missing'] }}|{{ d.get('missing', 'dflt') }}|{{ d.get('a') }}|{{ missing | default('dd') }}", {"d": {"a": 1}}),
        ("{{ [3, 1, 2] | sort }}|{{ range(3) | list }}|{{ [1, 2] | reverse | list }}|{{ [1, 2, 3] | last }}|{{ [1, 2, 3] | first }}|{{ [1, 2, 3] | sum }}|{{ ['b', 'a'] | join }}", {}),
        ("{{ 'x' in 'xyz' }} {{ 'k' in d }} {{ 2 in [1, 2] }} {{ 'q' not in d }} {{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ not false and (true or false) }}", {"d": {"k": 1}}),
        ("{{ 'yes' if flag else 'no' }}|{{ 'only' if flag }}|{{ 'only' if not flag }}", {"flag": False}),
        ("{{ x | string }}|{{ '3' | int + 1 }}|{{ 3 | float }}|{{ '2.5' | float }}|{{ x | string | length }}", {"x": 12}),
        ("{{ 'aXbX'.replace('X', '-') }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith('bc') }}|{{ 'abc'.upper() }}|{{ 'a b'.title() }}|{{ 'abcabc'.find('c') }}|{{ 'abcabc'.count('b') }}", {}),
        ("  {% if true %}\n    kept\n  {% endif %}\n  {%- if true %} stripped {% endif -%}\n  {%+ if true %}plus{% endif %}\nend", {}),
        ("{% for m in msgs %}\n  {{ m.role }}\n{% endfor %}\n{# comment #}\n  {# indented comment #}\nafter", {"msgs": msgs}),
        ("{{ raise_exception('boom: ' ~ n) }}", {"n": 2}),
        ("{{ a.b.c }}", {}),
        ("{% for m in msgs if m.role == 'user' %}{{ m.content }}{{ loop.index }}{% else %}none{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}", {"msgs": msgs}),
        ("{% set s %}captured {{ 1 + 1 }}{% endset %}[{{ s }}]", {}),
        ("{{ d | dictsort }}|{{ d | items | list }}|{{ d.keys() | list }}|{{ d.values() | list }}", {"d": {"b": 2, "a": 1}}),
        ("{{ 'a\\nb' }}|{{ \"it's\" }}|{{ 'tab\\there' }}|{{ '\\u00e9' }}", {}),
        ("{{ l[0].content }}|{{ l[-1]['role'] }}|{{ (l | length) - 1 }}|{{ l.0.role }}", {"l": msgs}),
        ("{{ x | tojson }}|{{ y | tojson }}|{{ z | tojson }}|{{ 'é\u2028<' | tojson }}|{{ [] | tojson }}|{{ {} | tojson }}",
         {"x": 1.0, "y": 123456789012345678.0, "z": 1e-7}),
        ("{% if x is defined and x is not none and x is not false %}set{% else %}unset{% endif %}|{{ x is true }}|{{ x is false }}", {"x": False}),
        ("{{ d | length }}|{{ s.split('</think>')[0].split('<think>')[-1].strip() }}|{{ s.split('</think>')[-1].lstrip('\\n') }}",
         {"d": {"a": 1}, "s": "<think>\nreason\n</think>\n\nanswer"}),
        ("{{ 5 | abs }}|{{ -2.5 | abs }}|{{ 2.567 | round(1) }}|{{ [1, 5, 3] | max }}|{{ [4, 2] | min }}|{{ [1,1,2] | unique | list }}|{{ 'hi' | indent(2) }}", {}),
        # Cases below were added later; keep appending so indices stay.
        ("{% if x %}\n  A\n{% elif y %}\n  B\n{% else %}\n  C\n{% endif %}\n", {"x": False, "y": True}),
        ("a {{- ' b ' -}} c\n  {%- for i in [1, 2] -%}\n    [{{ i }}]\n  {%- endfor %}\n  {% raw %}{{ not evaluated }} {% if %}{% endraw %}\nz", {}),
        ("{% for t in tools %}{{ t.function.name }}{{ ', ' if not loop.last }}{% endfor %}|{{ tools | map(attribute='type') | unique | list }}",
         {"tools": [{"type": "function", "function": {"name": "f1"}}, {"type": "function", "function": {"name": "f2"}}]}),
        ("{% for i in range(1, 10, 3) %}{{ i }}{% endfor %}|{{ [1, 2] + [3] }}|{{ 'b' in ['a', 'b'] }}|{{ 'abc' is sequence }}|{{ {'a': 1} is sequence }}", {}),
        ("{% set content = m.content if m.content is string else '' %}{{ content | length }}|{{ m.content is none }}|{{ m.tool_calls | length if m.tool_calls else 0 }}",
         {"m": {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}}),
        ("{%- macro render(x, indent=0) -%}{%- if x is mapping -%}{%- for k, v in x.items() -%}{{ ' ' * indent }}{{ k }}:\n{{ render(v, indent + 2) }}{%- endfor -%}{%- else -%}{{ ' ' * indent }}{{ x }}\n{%- endif -%}{%- endmacro -%}{{ render(d) }}",
         {"d": {"a": {"b": 1, "c": "x"}, "d": 2.5}}),
        ("{{ '<tag>' ~ x ~ '</tag>' }}|{{ x | trim | replace('\\n', ' ') }}|{{ x.split('\\n') | join('/') }}|{{ x.count('l') }}", {"x": " line1\nline2 "}),
    ]
    return T


def jinja_more_cases():
    """Operators, methods and filters that the Go side rewrites, and
    templates that hit the bounds of a sandboxed rendering."""
    return [
        ("{{ 2 ** 10 }}|{{ 2 ** -1 }}|{{ (-2) ** 3 }}|{{ 2 ** 3 ** 2 }}|{{ 2.0 ** 2 }}|{{ -2 ** 2 }}|{{ 10 ** 12 }}", {}),
        ("{{ ' a  b c '.split(none, 1) }}|{{ 'a,b,c'.split(',', maxsplit=1) }}|{{ ' a b '.split(maxsplit=0) }}|{{ 'a,b'.split(',', -1) }}|{{ 'x'.split('x') }}", {}),
        ("{{ [1, 2, 3, 4, 5][::2] }}|{{ [1, 2, 3][0:10 ** 18:2] }}|{{ 'hello'[-3:] }}|{{ 'héllo'[::-2] }}|{{ [1, 2, 3][5:] }}|{{ [1, 2, 3][-10:2] }}|{{ [1, 2, 3][:-1] }}", {}),
        ("[{{ 'ab' * 0 }}][{{ 'ab' * -1 }}]{{ 3 * 'x' }}|{{ [1, 2] * 2 }}|{{ 2 * 3 }}|{{ 1.5 * 2 }}|{{ [0] * 0 }}", {}),
        ("{{ 1 + 2.5 }}|{{ [1] + [2] }}|{{ 'a' + 'b' }}|{{ true + 1 }}|{{ 7 - 10 }}", {}),
        ("{{ 'a' + 1 }}", {}),
        ("{{ 1 ~ 2 + 3 }}", {}),
        ("{{ 'a' ~ 1 * 2 }}|{{ 'x' ~ 2 ** 2 }}|{{ none ~ 1 }}|{{ undefined_name ~ 'u' }}", {}),
        ("{{ -2.5 | abs }}|{{ -(2.5 | abs) }}|{{ not true | string }}|{{ - 3 | string }}", {}),
        ("{{ none is sameas none }}|{{ 'a' is in 'abc' }}|{{ 3 is odd }}|{{ x is eq 2 }}|{{ 1 < 2 < 3 }}|{{ 3 > 2 > 2 }}|{{ 'a' 'b' }}", {"x": 2}),
        ("{% for a, b in [(1, 2), (3, 4)] %}{{ a }}{{ b }};{% endfor %}|{% for (a, b) in {'k': 'v'}.items() %}{{ a }}={{ b }}{% endfor %}", {}),
        ("{{ {'a': 1, 'b': [2, 3]} | tojson }}|{{ {'k': 'v'}['k'] }}|{{ {} | length }}|{{ {'a': 1,} | length }}|{{ [1, 2,] | length }}", {}),
        ("{% set ns = namespace(a=1) %}{% set ns.a = ns.a + 1 %}{{ ns.a }}|{% set t = 1, 2 %}{{ t | length }}", {}),
        ("{{ '{}-{}'.format(1, 'x') }}|{{ '{0}{1}{0}'.format('a', 'b') }}|{{ '{{x}}{}'.format(1) }}|{{ '{n}!'.format(n=3) }}|{{ '{!r}'.format('q') }}", {}),
        ("{{ 'aaa'.replace('a', 'b', 2) }}|{{ 'abc'.replace('', '-') }}|{{ 'aXa' | replace('a', 'y', 1) }}|{{ 12 | replace('1', 'x') }}", {}),
        ("{{ [1, 'a', none] | join('-') }}|{{ 'abc' | join('.') }}|{{ [{'n': 'x'}, {'n': 'y'}] | join(',', attribute='n') }}|{{ {'k': 1, 'j': 2} | join }}", {}),
        ("{{ 'a\nb\n\nc' | indent(2) }}|{{ 'a\nb' | indent(2, true) }}|{{ 'a\n\nb' | indent('> ', blank=true) }}|{{ 'a\r\nb' | indent }}", {}),
        ("{{ range(5, 0, -2) | list }}|{{ range(0) | list }}|{{ range(3, 1) | list }}|{{ range(-3) | list }}|{{ range(2, -7, -4) | list }}", {}),
        ("{% macro f(a, sep=', ', l=[1, 2]) %}{{ l | join(sep) }}{{ a }}{% endmacro %}{{ f(1) }}|{{ f(2, '-') }}|{{ f(3, l=[4]) }}", {}),
        ("{% macro r(n) %}{{ n }}{% if n > 0 %}{{ r(n - 1) }}{% endif %}{% endmacro %}{{ r(5) }}", {}),
        ("{% set l = [] %}{% set _ = l.append(1) %}{{ l }}", {}),
        ("{% set d = {} %}{% set _ = d.update({'a': 1}) %}{{ d }}", {}),
        ("{{ range(100001) | length }}", {}),
        ("{% for i in range(10 ** 12) %}{{ i }}{% endfor %}", {}),
        ("{{ range(100000) | length }}|{{ [1, 2, 3][1] }}", {}),
        ("{{ 'abc' | list }}|{{ {'a': 1, 'b': 2} | list }}|{% for c in 'hé' %}[{{ c }}]{% endfor %}|{{ 'x y' | list | length }}|{{ [1, 2] | list }}", {}),
        ("{{ 5 | list }}", {}),
    ]


def jinja_env():
    """The environment transformers renders chat templates with."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        return _compile_jinja_template, "transformers"
    except Exception:  # fall back to a copy of its settings
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        return env.from_string, "fallback"


def render_jinja(out_dir):
    compile_fn, how = jinja_env()
    if how == "fallback":
        import jinja2
        how = "jinja2 " + jinja2.__version__ + " set up as transformers does"
    for name, templates in (("jinja.json", jinja_cases()), ("jinja_more.json", jinja_more_cases())):
        cases = []
        for tmpl, ctx in templates:
            rec = {"template": tmpl, "context": ctx}
            try:
                rec["output"] = compile_fn(tmpl).render(**ctx)
            except Exception as e:  # the Go engine must fail too
                rec["error"] = f"{type(e).__name__}: {e}"
            cases.append(rec)
        write(os.path.join(out_dir, name), {"environment": how, "cases": cases})


def as_text(x):
    if isinstance(x, str):
        return x
    raise TypeError(f"apply_chat_template returned {type(x).__name__}")


def tokenizer_fixture(name, path):
    tok = AutoTokenizer.from_pretrained(path)
    raw = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    rec = {
        "name": name,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer_class": type(tok).__name__,
        "vocab_size": len(tok),
        "raw_vocab_size": raw.get_vocab_size(with_added_tokens=True),
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "cases": [],
        "chats": [],
    }
    texts = dict(TEXTS)
    try:
        texts.update(special_texts(tok))
    except Exception:
        traceback.print_exc()
    for key, text in texts.items():
        c = {"name": key, "text": text}
        try:
            # The reference is the tokenizers library running tokenizer.json.
            c["ids"] = raw.encode(text, add_special_tokens=False).ids
            c["ids_special"] = raw.encode(text, add_special_tokens=True).ids
            c["decoded"] = raw.decode(c["ids"], skip_special_tokens=False)
            c["decoded_special"] = raw.decode(c["ids_special"], skip_special_tokens=False)
            # transformers may rebuild the tokenizer from its class (v5 does
            # for LlamaTokenizer); record where it differs, for the record.
            hf = tok.encode(text, add_special_tokens=False)
            hfs = tok.encode(text, add_special_tokens=True)
            if hf != c["ids"]:
                c["hf_ids"] = hf
            if hfs != c["ids_special"]:
                c["hf_ids_special"] = hfs
            hd = tok.decode(c["ids"])
            if hd != c["decoded"]:
                c["hf_decoded"] = hd
        except Exception as e:
            c["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rec["cases"].append(c)
    if tok.chat_template:
        for cname, only, messages, kw in chats():
            if only is not None and name not in only:
                continue
            kw = dict(kw)
            tools = kw.pop("tools", None)
            for agp in (False, True):
                ch = {"name": cname, "messages": messages, "add_generation_prompt": agp}
                if tools is not None:
                    ch["tools"] = tools
                if kw:
                    ch["extra"] = kw
                try:
                    ch["text"] = as_text(tok.apply_chat_template(
                        messages, tools=tools, add_generation_prompt=agp, tokenize=False, **kw))
                except Exception as e:
                    ch["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                rec["chats"].append(ch)
    return rec


def write(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("wrote", path, os.path.getsize(path), "bytes", flush=True)


def main():
    args = [a for a in sys.argv[1:] if a != "--jinja-only"]
    out_dir = args[0] if args else os.path.join(ROOT, "testdata", "tokenizer")
    os.makedirs(out_dir, exist_ok=True)
    if JINJA_ONLY:
        render_jinja(out_dir)
        return
    print("transformers", transformers.__version__, "tokenizers", tokenizers.__version__, flush=True)
    render_jinja(out_dir)
    dirs = sorted(glob.glob(os.path.join(ROOT, "testdata", "tokenizers", "*")))
    dirs.append(os.path.join(ROOT, "testdata", "tokenizer", "glm"))
    for d in dirs:
        name = os.path.basename(d)
        try:
            write(os.path.join(out_dir, name + ".json"), tokenizer_fixture(name, d))
        except Exception:
            print("FAILED", name, flush=True)
            traceback.print_exc()


if __name__ == "__main__":
    main()
