package glm4moelite

import "github.com/mmfp4/mmfp4/backend"

// Check reads dir as Load does (config, then every tensor the forward pass
// needs, with its dtype and shape) but keeps no weights, and releases the
// files. The quantizer runs it on its source before converting and on its
// output before reporting success. It reads every weight once: tensors of a
// plain checkpoint are widened to float32 one at a time and dropped.
func Check(dir string) error {
	ld, cfg, err := openDir(dir, shapeOnly{}, LoadOptions{})
	if err != nil {
		return err
	}
	defer ld.set.Close()
	_, err = ld.model(cfg)
	return err
}

// shapeOnly is a backend that accepts weights and keeps only their shapes.
// Loading calls nothing else on a backend; any other op would panic on the
// nil embedded interface.
type shapeOnly struct{ backend.Backend }

type shape struct{ n, k int }

func (s shape) Rows() int { return s.n }
func (s shape) Cols() int { return s.k }

func (shapeOnly) NewWeight(w backend.HostWeight) (backend.Weight, error) {
	return shape{w.N, w.K}, nil
}
