package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// indexName is the Hugging Face index of a sharded checkpoint.
const indexName = "model.safetensors.index.json"

// Set is all tensors of a model directory, possibly spread over several
// files.
type Set struct {
	dir   string
	files []*File
	where map[string]*File // tensor name -> file holding it
	names []string
}

// OpenDir opens the tensors of a model directory: the shards listed by
// model.safetensors.index.json if present, else every *.safetensors file in
// the directory. A tensor name found in two files is an error.
func OpenDir(dir string) (*Set, error) {
	s := &Set{dir: dir, where: map[string]*File{}}
	if err := s.open(); err != nil {
		s.Close()
		return nil, err
	}
	for name := range s.where {
		s.names = append(s.names, name)
	}
	slices.Sort(s.names)
	return s, nil
}

func (s *Set) open() error {
	indexPath := filepath.Join(s.dir, indexName)
	raw, err := os.ReadFile(indexPath)
	if err == nil {
		return s.openIndexed(indexPath, raw)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}

	ents, err := os.ReadDir(s.dir) // sorted by name
	if err != nil {
		return err
	}
	for _, e := range ents {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".safetensors") {
			continue
		}
		if err := s.add(filepath.Join(s.dir, e.Name())); err != nil {
			return err
		}
	}
	if len(s.files) == 0 {
		return fmt.Errorf("%s: no %s and no *.safetensors files", s.dir, indexName)
	}
	return nil
}

// openIndexed opens the shards named by the index and checks that each
// tensor really is in the shard the index says.
func (s *Set) openIndexed(indexPath string, raw []byte) error {
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(raw, &idx); err != nil {
		return fmt.Errorf("%s: %w", indexPath, err)
	}
	if len(idx.WeightMap) == 0 {
		return fmt.Errorf("%s: missing or empty weight_map", indexPath)
	}
	shards := slices.Sorted(maps.Values(idx.WeightMap))
	shards = slices.Compact(shards)
	for _, shard := range shards {
		// Shards live in the model directory; refuse paths that escape it.
		if !filepath.IsLocal(shard) {
			return fmt.Errorf("%s: shard %q is not a path inside %s", indexPath, shard, s.dir)
		}
		if err := s.add(filepath.Join(s.dir, shard)); err != nil {
			return fmt.Errorf("%s: shard %s: %w", indexPath, shard, err)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(idx.WeightMap)) {
		shard := idx.WeightMap[name]
		if f := s.where[name]; f == nil || f.Path() != filepath.Join(s.dir, shard) {
			return fmt.Errorf("%s: tensor %s is mapped to shard %s, which does not hold it", indexPath, name, shard)
		}
	}
	return nil
}

// add opens one file and records its tensors.
func (s *Set) add(path string) error {
	f, err := Open(path)
	if err != nil {
		return err
	}
	s.files = append(s.files, f)
	for _, name := range f.names {
		if other := s.where[name]; other != nil {
			return fmt.Errorf("tensor %s is in both %s and %s", name, other.Path(), path)
		}
		s.where[name] = f
	}
	return nil
}

// Names returns all tensor names, sorted.
func (s *Set) Names() []string { return slices.Clone(s.names) }

// Has reports whether the set holds the named tensor.
func (s *Set) Has(name string) bool { return s.where[name] != nil }

// Tensor returns the named tensor from whichever file holds it.
func (s *Set) Tensor(name string) (*Tensor, error) {
	f := s.where[name]
	if f == nil {
		return nil, fmt.Errorf("tensor %s not found in %s", name, s.dir)
	}
	return f.Tensor(name)
}

// Metadata returns the __metadata__ of all files merged; where files
// disagree on a key, the file that sorts last wins.
func (s *Set) Metadata() map[string]string {
	m := map[string]string{}
	for _, f := range s.files {
		maps.Copy(m, f.metadata)
	}
	return m
}

// Prefault maps every page of every file of the set (File.Prefault).
func (s *Set) Prefault() error {
	for _, f := range s.files {
		if err := f.Prefault(); err != nil {
			return err
		}
	}
	return nil
}

// Close closes every file of the set.
func (s *Set) Close() error {
	var errs []error
	for _, f := range s.files {
		errs = append(errs, f.Close())
	}
	return errors.Join(errs...)
}
