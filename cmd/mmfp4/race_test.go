//go:build race

package main

// raceBuild is true when the tests run with the race detector, which makes
// the dense float path too slow for the longest model runs.
const raceBuild = true
