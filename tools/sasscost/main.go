// Command sasscost reads `cuobjdump -sass` output of one kernel (sm_70 and
// later) and sums, between two addresses, the stall cycles its scheduler
// control codes give each instruction, and counts the instructions that
// wait on a scoreboard (a load, a shuffle, a MUFU or conversion result).
// At one warp a scheduler, which is how the batch-1 decode kernels run
// after their wait, that sum plus the waits' latencies is the section's
// time (docs/perf.md, 2026-11-29 (11)): a static estimate, with no GPU.
//
//	cuobjdump -sass -fun add_norm_gemv_pair quant.cubin > k.sass
//	go run ./tools/sasscost -from 0af0 -to 2920 [-v] k.sass
//
// With -wait it reads a whole listing instead and prints, for each
// function, its global loads (LDG) and its copies into shared memory
// (LDGSTS, bulk and tensor copies) before its first ACQBULK
// (griddepcontrol.wait) and after each: ptxas may move a read-only load
// past the wait, where the source asked for it before (docs/perf.md,
// 2026-11-30 (30)).
//
//	cuobjdump -sass moe.cubin > moe.sass
//	go run ./tools/sasscost -wait moe.sass
//
// With -held it lists, for each function of a whole listing, the waits on
// a load's scoreboard that come between its loads: the loads after such a
// wait are issued only once the loads it waits for have arrived. ptxas
// can give all of a kernel's global loads one scoreboard, so that waiting
// for one value (a pointer, a scale) waits for every load before it
// (docs/perf.md, 2026-12-02 (40)). Read in address order, branches
// ignored.
//
//	go run ./tools/sasscost -held moe.sass
//
// cuobjdump comes with Debian's nvidia-cuda-toolkit package (CUDA 11.8
// reads sm_90 images); the images are what NVRTC writes (backend/cuda).
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// inst is one instruction with its control code's fields.
type inst struct {
	addr                   uint64
	text                   string
	stall, writeBar, waits int // waits: the scoreboards it waits on, as a mask
}

// An instruction line: /*0af0*/ TEXT ; /* 0x<low word> */, the next line
// /* 0x<high word> */, whose bits 41 and up (bits 105-125 of the 128-bit
// word) are the control code: stall 4 bits, yield 1, write barrier 3,
// read barrier 3, wait mask 6, reuse 4.
var (
	instLine = regexp.MustCompile(`/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\* 0x[0-9a-f]{16} \*/`)
	wordLine = regexp.MustCompile(`^\s*/\* (0x[0-9a-f]{16}) \*/\s*$`)
)

func parse(r io.Reader) ([]inst, error) {
	var out []inst
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var pending *inst
	for sc.Scan() {
		line := sc.Text()
		if m := instLine.FindStringSubmatch(line); m != nil {
			a, err := strconv.ParseUint(m[1], 16, 64)
			if err != nil {
				return nil, err
			}
			out = append(out, inst{addr: a, text: strings.TrimSuffix(strings.TrimSpace(m[2]), " ;")})
			pending = &out[len(out)-1]
			continue
		}
		if m := wordLine.FindStringSubmatch(line); m != nil && pending != nil {
			hi, err := strconv.ParseUint(m[1], 0, 64)
			if err != nil {
				return nil, err
			}
			c := hi >> 41
			pending.stall = int(c & 0xF)
			pending.writeBar = int(c >> 5 & 7)
			pending.waits = int(c >> 11 & 0x3F)
			pending = nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no SASS instructions (want cuobjdump -sass output)")
	}
	return out, nil
}

func main() {
	from := flag.String("from", "0", "first address (hex), inclusive")
	to := flag.String("to", "ffffffff", "last address (hex), exclusive")
	verbose := flag.Bool("v", false, "print every instruction with its stall and waits")
	wait := flag.Bool("wait", false, "for each function of a whole listing, the loads and copies before its first wait and after each")
	held := flag.Bool("held", false, "for each function of a whole listing, the waits on loads' scoreboards between its loads")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: sasscost [-from HEX] [-to HEX] [-v] FILE | sasscost -wait FILE | sasscost -held FILE")
		os.Exit(2)
	}
	if *wait {
		report(flag.Arg(0), func(text []byte) ([]waitLoads, error) { return loadsAroundWait(bytes.NewReader(text)) })
		return
	}
	if *held {
		report(flag.Arg(0), heldLoads)
		return
	}
	lo, err1 := strconv.ParseUint(*from, 16, 64)
	hi, err2 := strconv.ParseUint(*to, 16, 64)
	if err1 != nil || err2 != nil {
		fmt.Fprintln(os.Stderr, "sasscost: -from and -to take hexadecimal addresses")
		os.Exit(2)
	}
	text, err := os.ReadFile(flag.Arg(0))
	var insts []inst
	if err == nil {
		insts, err = parse(bytes.NewReader(text))
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "sasscost: %s: %v\n", flag.Arg(0), err)
		os.Exit(1)
	}
	n, stalls, waiting := summarize(os.Stdout, insts, lo, hi, *verbose)
	fmt.Printf("%d instructions, %d stall cycles, %d wait on a scoreboard\n", n, stalls, waiting)
}

// report prints what read finds in the listing at path, one line each.
func report[T fmt.Stringer](path string, read func([]byte) ([]T, error)) {
	text, err := os.ReadFile(path)
	var items []T
	if err == nil {
		items, err = read(text)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "sasscost: %s: %v\n", path, err)
		os.Exit(1)
	}
	for _, it := range items {
		fmt.Println(it)
	}
}

// summarize sums the section [lo, hi) and, verbose, lists it.
func summarize(w io.Writer, insts []inst, lo, hi uint64, verbose bool) (n, stalls, waiting int) {
	for _, in := range insts {
		if in.addr < lo || in.addr >= hi {
			continue
		}
		n++
		stalls += in.stall
		if in.waits != 0 {
			waiting++
		}
		if verbose {
			bar := "-"
			if in.writeBar < 7 {
				bar = strconv.Itoa(in.writeBar)
			}
			fmt.Fprintf(w, "%04x %2d sets %s waits %06b  %s\n", in.addr, in.stall, bar, in.waits, in.text)
		}
	}
	return n, stalls, waiting
}

// waitLoads is one function's global loads and copies into shared memory
// in each stretch of its code between waits, in address order (a wait
// inside a branch, such as one kind of block's, still splits the code).
type waitLoads struct {
	fn            string
	loads, copies []int // stretch i follows the i-th wait
}

func (w waitLoads) String() string {
	if len(w.loads) == 1 {
		return fmt.Sprintf("%s: no wait; %d loads, %d copies", w.fn, w.loads[0], w.copies[0])
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s: before the wait %d loads, %d copies", w.fn, w.loads[0], w.copies[0])
	for i := 1; i < len(w.loads); i++ {
		fmt.Fprintf(&b, "; after wait %d, %d loads, %d copies", i, w.loads[i], w.copies[i])
	}
	return b.String()
}

var functionLine = regexp.MustCompile(`Function : (\S+)`)

// loadsAroundWait counts, in a cuobjdump -sass listing, each function's
// LDG (global loads), and LDGSTS, UBLKCP and UTMALDG (copies into shared
// memory), between its ACQBULKs.
func loadsAroundWait(r io.Reader) ([]waitLoads, error) {
	var out []waitLoads
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if m := functionLine.FindStringSubmatch(line); m != nil {
			out = append(out, waitLoads{fn: m[1], loads: []int{0}, copies: []int{0}})
			continue
		}
		m := instLine.FindStringSubmatch(line)
		if m == nil || len(out) == 0 {
			continue
		}
		w := &out[len(out)-1]
		last := len(w.loads) - 1
		switch op := opcode(m[2]); {
		case op == "ACQBULK":
			w.loads, w.copies = append(w.loads, 0), append(w.copies, 0)
		case op == "LDG":
			w.loads[last]++
		case isCopy(op):
			w.copies[last]++
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no functions (want cuobjdump -sass output of a whole image)")
	}
	return out, nil
}

// heldLoad is a wait on a scoreboard that loads set, followed by another
// load: that load is issued only once the waited-for loads have arrived.
type heldLoad struct {
	fn         string
	wait, next uint64   // the waiting instruction, the first load after it
	sb         int      // the scoreboard
	held       []uint64 // the loads waited for
}

func (h heldLoad) String() string {
	return fmt.Sprintf("%s: %04x waits on scoreboard %d for %d loads (%04x to %04x) before the load at %04x",
		h.fn, h.wait, h.sb, len(h.held), h.held[0], h.held[len(h.held)-1], h.next)
}

// opcode is an instruction's operation without its predicate and suffixes.
func opcode(text string) string {
	f := strings.Fields(text)
	if len(f) > 0 && strings.HasPrefix(f[0], "@") {
		f = f[1:]
	}
	if len(f) == 0 {
		return ""
	}
	name, _, _ := strings.Cut(f[0], ".")
	return name
}

// isCopy reports whether op copies global memory into shared memory.
func isCopy(op string) bool { return op == "LDGSTS" || op == "UBLKCP" || op == "UTMALDG" }

// heldLoads reads a whole cuobjdump -sass listing function by function.
// A global load (LDG) joins the pending set of the scoreboard it sets; an
// instruction that waits on a scoreboard with pending loads takes them;
// if a load or a copy into shared memory follows before the function
// ends, the wait is reported.
func heldLoads(text []byte) ([]heldLoad, error) {
	names := functionLine.FindAllSubmatchIndex(text, -1)
	if len(names) == 0 {
		return nil, fmt.Errorf("no functions (want cuobjdump -sass output of a whole image)")
	}
	var out []heldLoad
	for i, m := range names {
		end := len(text)
		if i+1 < len(names) {
			end = names[i+1][0]
		}
		insts, err := parse(bytes.NewReader(text[m[1]:end]))
		if err != nil {
			continue // a function without code
		}
		fn := string(text[m[2]:m[3]])
		var pending [6][]uint64
		var open []heldLoad
		for _, in := range insts {
			op := opcode(in.text)
			isLoad := op == "LDG" || isCopy(op)
			for sb := 0; sb < 6; sb++ {
				if in.waits&(1<<sb) != 0 && len(pending[sb]) > 0 {
					open = append(open, heldLoad{fn: fn, wait: in.addr, sb: sb, held: pending[sb]})
					pending[sb] = nil
				}
			}
			if isLoad {
				for _, h := range open {
					h.next = in.addr
					out = append(out, h)
				}
				open = nil
			}
			if op == "LDG" && in.writeBar < 6 {
				pending[in.writeBar] = append(pending[in.writeBar], in.addr)
			}
		}
	}
	return out, nil
}
