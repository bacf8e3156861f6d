//go:build !unix

package bench

func peakRSS() int64 { return 0 }
