package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

func init() {
	var (
		mf  modelFlags
		ids string
		out string
	)
	cmd := &cobra.Command{
		Use:   "logits [-m DIR] --ids 1,2,3 [--out FILE.npy | --out -]",
		Short: "Write the float32 logits of every position (rows = positions, cols = vocabulary)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			prompt, err := parseIDs(ids)
			if err != nil {
				return err
			}
			m, err := mf.load()
			if err != nil {
				return err
			}
			defer m.Close()
			logits, err := m.Logits(prompt)
			if err != nil {
				return err
			}
			vocab := m.Config().VocabSize
			if out == "-" {
				w := bufio.NewWriter(cmd.OutOrStdout())
				if err := encodeNpy(w, logits, len(prompt), vocab); err != nil {
					return fmt.Errorf("writing logits to stdout: %w", err)
				}
				if err := w.Flush(); err != nil {
					return fmt.Errorf("writing logits to stdout: %w", err)
				}
				return nil
			}
			if out == "" {
				w := bufio.NewWriter(cmd.OutOrStdout())
				for p := range prompt {
					row := logits[p*vocab : (p+1)*vocab]
					best := 0
					for i, v := range row {
						if v > row[best] {
							best = i
						}
					}
					fmt.Fprintf(w, "position %d: token %d, argmax %d (%.4f)\n", p, prompt[p], best, row[best])
				}
				return w.Flush() // a bufio.Writer keeps its first error
			}
			return writeNpy(out, logits, len(prompt), vocab)
		},
	}
	mf.register(cmd)
	cmd.Flags().StringVar(&ids, "ids", "", "token ids, comma-separated (required)")
	cmd.Flags().StringVarP(&out, "out", "o", "", "write a float32 .npy file instead of a summary (-: to stdout)")
	_ = cmd.MarkFlagRequired("ids")
	rootCmd.AddCommand(cmd)
}

// writeNpy writes a little-endian float32 C-order array in NumPy's .npy
// format, version 1.0. A regular file left incomplete by a failed write is
// removed.
func writeNpy(path string, v []float32, rows, cols int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	err = encodeNpy(w, v, rows, cols)
	if err == nil {
		err = w.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if st, serr := os.Stat(path); serr == nil && st.Mode().IsRegular() {
			os.Remove(path)
		}
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func encodeNpy(w io.Writer, v []float32, rows, cols int) error {
	header := fmt.Sprintf("{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }", rows, cols)
	// magic(6) + version(2) + length(2) + header + '\n' is padded to 64 bytes.
	pad := 64 - (10+len(header)+1)%64
	header += strings.Repeat(" ", pad%64) + "\n"
	buf := []byte("\x93NUMPY\x01\x00")
	buf = binary.LittleEndian.AppendUint16(buf, uint16(len(header)))
	buf = append(buf, header...)
	if _, err := w.Write(buf); err != nil {
		return err
	}
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	_, err := w.Write(b)
	return err
}
