// Command mmfp4 runs GLM-4.7-Flash-class models stored in the MMFP4 format.
// This package holds flags and subcommands only; the work lives in the
// library packages.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

var rootCmd = &cobra.Command{
	Use:           "mmfp4",
	Short:         "Inference engine for GLM-4.7-Flash-class models in the MMFP4 4-bit format",
	SilenceUsage:  true,
	SilenceErrors: true,
}

func main() {
	err := rootCmd.Execute()
	if perr := stopCPUProfile(); err == nil {
		err = perr
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mmfp4:", err)
		os.Exit(1)
	}
}
