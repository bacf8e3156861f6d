//go:build !linux

package bench

import "errors"

func residentFraction(paths []string) (float64, bool) { return 0, false }

func pmdMappedBytes() (int64, bool) { return 0, false }

func dropCache(paths []string) error {
	return errors.New("dropping the page cache is only implemented on Linux")
}
