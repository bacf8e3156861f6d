package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"unicode/utf8"

	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4/chat"
	"github.com/mmfp4/mmfp4/tokenizer"
)

// Tokenizer commands: they need only the tokenizer files of a model dir.

func init() {
	var dir string
	var addSpecial bool
	tokenize := &cobra.Command{
		Use:   "tokenize [-m DIR] [--add-special]",
		Short: "Print the token ids of the text on stdin as a JSON array",
		Long: "Reads text on stdin and prints its token ids as one JSON array. Special tokens\n" +
			"written in the text are recognised. With --add-special, the tokens of the\n" +
			"model's post-processor (BOS/EOS) are added.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tok, err := loadTokenizer(dir)
			if err != nil {
				return err
			}
			text, err := io.ReadAll(cmd.InOrStdin())
			if err != nil {
				return err
			}
			if !utf8.Valid(text) {
				return errors.New("tokenize: stdin is not valid UTF-8")
			}
			ids, err := tok.Encode(string(text), addSpecial)
			if err != nil {
				return err
			}
			out, _ := json.Marshal(ids)
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s\n", out)
			return err
		},
	}
	tokenize.Flags().StringVarP(&dir, "model", "m", "", "model directory with tokenizer.json (default: the built-in demo model)")
	tokenize.Flags().BoolVar(&addSpecial, "add-special", false, "add the post-processor's special tokens (BOS/EOS)")

	var detokDir string
	detokenize := &cobra.Command{
		Use:   "detokenize [-m DIR]",
		Short: "Print the text of a JSON array of token ids read on stdin",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tok, err := loadTokenizer(detokDir)
			if err != nil {
				return err
			}
			data, err := io.ReadAll(cmd.InOrStdin())
			if err != nil {
				return err
			}
			var ids []int
			dec := json.NewDecoder(bytes.NewReader(data))
			if err := dec.Decode(&ids); err != nil {
				return fmt.Errorf("detokenize: stdin must be a JSON array of integer ids: %w", err)
			}
			if dec.More() {
				return errors.New("detokenize: stdin has data after the JSON array")
			}
			text, err := tok.Decode(ids)
			if err != nil {
				return err
			}
			_, err = io.WriteString(cmd.OutOrStdout(), text)
			return err
		},
	}
	detokenize.Flags().StringVarP(&detokDir, "model", "m", "", "model directory with tokenizer.json (default: the built-in demo model)")

	var chatDir, messagesFile string
	var addGen bool
	chatTemplate := &cobra.Command{
		Use:   "chat-template [-m DIR] --messages FILE.json [--add-generation-prompt]",
		Short: "Print the prompt that the model's chat template makes of messages",
		Long: "FILE.json holds a JSON array of messages ({\"role\", \"content\", ...}), or an\n" +
			"object {\"messages\": [...], \"tools\": [...], ...} whose other keys (such as\n" +
			"enable_thinking) are passed to the template. Prints the prompt and nothing else.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tok, err := loadTokenizer(chatDir)
			if err != nil {
				return err
			}
			data, err := os.ReadFile(messagesFile)
			if err != nil {
				return err
			}
			p, err := chat.ParseFile(data)
			if err != nil {
				return fmt.Errorf("chat-template: %s: %w", messagesFile, err)
			}
			p.Options.AddGenerationPrompt = addGen
			prompt, err := tok.ApplyChatTemplate(p.Messages, p.Options)
			if err != nil {
				return err
			}
			_, err = io.WriteString(cmd.OutOrStdout(), prompt)
			return err
		},
	}
	chatTemplate.Flags().StringVarP(&chatDir, "model", "m", "", "model directory with tokenizer files (default: the built-in demo model)")
	chatTemplate.Flags().StringVar(&messagesFile, "messages", "", "JSON file with the messages")
	chatTemplate.Flags().BoolVar(&addGen, "add-generation-prompt", false, "end with the opening of an assistant turn")
	_ = chatTemplate.MarkFlagRequired("messages")

	rootCmd.AddCommand(tokenize, detokenize, chatTemplate)
}

// loadTokenizer loads the tokenizer of dir, or of the built-in model.
func loadTokenizer(dir string) (*tokenizer.Tokenizer, error) {
	dir, err := modelDir(dir)
	if err != nil {
		return nil, err
	}
	return tokenizer.Load(dir)
}
