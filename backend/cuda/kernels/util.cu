// Small utility kernels.

// spin keeps the GPU busy for about the given number of clock cycles. A
// benchmark queues it first so that the host can queue the launches it
// times before the GPU reaches them: the events then measure device time
// alone, as a graph replay would, not the host's launch rate.
extern "C" __global__ void spin(long long cycles) {
  PDL_WAIT();  // a kernel in a programmatic chain waits, so that the chain stays ordered
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}
