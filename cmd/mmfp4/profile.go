package main

import (
	"fmt"
	"os"
	"runtime/pprof"

	"github.com/spf13/cobra"
)

// --cpuprofile writes a pprof CPU profile of any command, so that a slow run
// on a user's machine can be examined with `go tool pprof`.
var (
	cpuProfile     string
	cpuProfileFile *os.File // open while a profile is being written
)

func init() {
	rootCmd.PersistentFlags().StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile (pprof format) of the command to this file")
	rootCmd.PersistentPreRunE = func(*cobra.Command, []string) error {
		if cpuProfile == "" {
			return nil
		}
		f, err := os.Create(cpuProfile)
		if err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return fmt.Errorf("--cpuprofile %s: %w", cpuProfile, err)
		}
		cpuProfileFile = f
		return nil
	}
	rootCmd.PersistentPostRunE = func(*cobra.Command, []string) error { return stopCPUProfile() }
}

// stopCPUProfile finishes the profile, if one is being written. main calls
// it too, so a command that fails still leaves a readable profile.
func stopCPUProfile() error {
	f := cpuProfileFile
	if f == nil {
		return nil
	}
	cpuProfileFile = nil
	pprof.StopCPUProfile()
	if err := f.Close(); err != nil {
		return fmt.Errorf("--cpuprofile %s: %w", f.Name(), err)
	}
	return nil
}
