package chat

import (
	"encoding/json"
	"reflect"
	"testing"
)

// FuzzParser checks, on any text, that streaming in random pieces gives
// what parsing it whole gives, that every call's arguments are a JSON
// object, and that nothing panics.
func FuzzParser(f *testing.F) {
	for _, c := range goldenCases {
		f.Add(c.output, c.reasoning, uint64(1))
	}
	f.Add("<tool_call>get_weather<arg_key>city</arg_key><arg_value>x</arg_value></arg_value> <arg_key>", false, uint64(3))
	f.Add("</think><think><tool_call>get_time\n\n</tool_call></tool_call>", true, uint64(5))
	f.Fuzz(func(t *testing.T, output string, reasoning bool, seed uint64) {
		opt := func() ParserOptions {
			return ParserOptions{Reasoning: reasoning, Tools: goldenTools, NewID: counterIDs()}
		}
		whole := Parse(output, opt())
		for _, c := range whole.ToolCalls {
			var obj map[string]any
			if err := json.Unmarshal([]byte(c.Arguments), &obj); err != nil {
				t.Fatalf("arguments %q: %v", c.Arguments, err)
			}
		}
		got := Assemble(streamCheck(t, opt(), splitPieces(output, seed)))
		if !reflect.DeepEqual(got, whole) {
			t.Fatalf("streamed\n got %#v\nwhole %#v", got, whole)
		}
	})
}
