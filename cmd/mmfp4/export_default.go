package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4/defaultmodel"
)

// modelDir is the model directory a command runs on: dir itself, or the
// built-in demo model when no -m was given.
func modelDir(dir string) (string, error) {
	if dir != "" {
		return dir, nil
	}
	return defaultmodel.Dir()
}

func init() {
	var out string
	cmd := &cobra.Command{
		Use:   "export-default -o DIR",
		Short: "Write the built-in demo model out as an MMFP4 model directory",
		Long: "The built-in model is a small glm4_moe_lite model trained on State of the Union\n" +
			"addresses (a demo of the engine, not an assistant), in MMFP4 with group size 128.\n" +
			"Every command runs it when no -m is given.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := defaultmodel.Export(out); err != nil {
				return fmt.Errorf("export-default: %w", err)
			}
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "wrote %s (%d files)\n", out, len(defaultmodel.Files()))
			return err
		},
	}
	cmd.Flags().StringVarP(&out, "output", "o", "", "output directory; must not exist or be empty (required)")
	_ = cmd.MarkFlagRequired("output")
	rootCmd.AddCommand(cmd)
}
