package glm4moelite

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Values that parse but cannot work are refused, naming the field.
func TestRejectUnworkableConfigValues(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(fixtureDir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		field string
		value any
	}{
		{"rms_norm_eps", 0},
		{"rms_norm_eps", -1e-5},
		{"rms_norm_eps", 1e-60}, // rounds to 0 in float32
		{"max_position_embeddings", 0},
		{"max_position_embeddings", -16},
	} {
		var m map[string]any
		if err := json.Unmarshal(data, &m); err != nil {
			t.Fatal(err)
		}
		m[tc.field] = tc.value
		_, err := parse(t, m)
		if err == nil || !strings.Contains(err.Error(), `"`+tc.field+`"`) {
			t.Errorf("%s = %v: err = %v, want an error naming the field", tc.field, tc.value, err)
		}
	}
	// The fixture itself, and a config without max_position_embeddings, load.
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	if _, err := parse(t, m); err != nil {
		t.Fatal(err)
	}
	delete(m, "max_position_embeddings")
	if c, err := parse(t, m); err != nil || c.MaxPositions != 0 {
		t.Errorf("without max_position_embeddings: %v, MaxPositions %v", err, c)
	}
}
