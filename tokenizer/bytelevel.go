package tokenizer

import "unicode/utf8"

// The byte-level alphabet of GPT-2 style tokenizers: every byte is shown as
// one printable rune so that BPE can work on text without spaces or control
// characters. Printable Latin-1 bytes stand for themselves; the others are
// shifted to U+0100 and up, in byte order.
var (
	byteToRune [256]rune
	runeToByte = map[rune]byte{}
	// byteToStr caches the one-rune strings, to build words without allocating.
	byteToStr [256]string
	// runeByte is runeToByte as an array for the hot path; -1 off the alphabet.
	runeByte [byteRuneLimit]int16
)

// byteRuneLimit is one past the largest rune of the alphabet (U+0143).
const byteRuneLimit = 256 + 68

func init() {
	for i := range runeByte {
		runeByte[i] = -1
	}
	shift := rune(0)
	for b := 0; b < 256; b++ {
		printable := (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)
		r := rune(b)
		if !printable {
			r = 256 + shift
			shift++
		}
		byteToRune[b] = r
		runeToByte[r] = byte(b)
		runeByte[r] = int16(b)
		byteToStr[b] = string(r)
	}
}

// byteLevelEncode maps each byte of s to its byte-level rune.
func byteLevelEncode(s string) string {
	buf := make([]byte, 0, 2*len(s))
	for i := 0; i < len(s); i++ {
		buf = utf8.AppendRune(buf, byteToRune[s[i]])
	}
	return string(buf)
}

// byteLevelDecodeToken maps a token's runes back to bytes. A token holding a
// rune outside the alphabet (an added token such as "<｜User｜>") is kept as
// its own UTF-8 bytes, as the reference decoder does.
func byteLevelDecodeToken(dst []byte, tok string) []byte {
	start := len(dst)
	for _, r := range tok {
		b, ok := runeToByte[r]
		if !ok {
			return append(dst[:start], tok...)
		}
		dst = append(dst, b)
	}
	return dst
}
