package bench

import "os"

// resetPeakRSS restarts the peak-RSS high-water mark (Linux 4.0 and later),
// so that the peak reported covers the model and not the bandwidth test's
// buffer, which is handed back before the model loads.
func resetPeakRSS() {
	_ = os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
}
