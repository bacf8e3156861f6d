package mmfp4_test

import (
	"context"
	"fmt"
	"log"

	"github.com/mmfp4/mmfp4"
)

// Greedy generation on the tiny fixture model. The expected tokens are the
// greedy continuation that HF transformers produced for the same prompt.
func Example() {
	m, err := mmfp4.Load("testdata/glm4moelite-tiny", mmfp4.Options{})
	if err != nil {
		log.Fatal(err)
	}
	prompt := []int{248, 475, 240, 439, 34, 19, 502, 29, 502, 22, 169, 295}
	var streamed []int
	res, err := m.Generate(context.Background(), prompt, mmfp4.GenerateOptions{
		MaxTokens: 8,
		OnToken:   func(id int) error { streamed = append(streamed, id); return nil },
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(streamed)
	fmt.Println(res.StopReason, len(res.Tokens))
	// Output:
	// [253 54 340 340 340 340 340 161]
	// max_tokens 8
}
