package constrain

import (
	"container/list"
	"sync"
)

// Cache keeps recently used grammars, so that requests with the same
// schema share one grammar and its cached token sets. Safe for concurrent
// use.
type Cache struct {
	mu    sync.Mutex
	max   int
	order *list.List // of *cacheEntry, most recent first
	byKey map[string]*list.Element
}

type cacheEntry struct {
	key  string
	once sync.Once
	g    *Grammar
	err  error
}

// NewCache keeps up to max grammars.
func NewCache(max int) *Cache {
	return &Cache{max: max, order: list.New(), byKey: map[string]*list.Element{}}
}

// Get returns the grammar cached under key, or compiles build's Expr over
// v with opt and caches it. The key must name everything that shapes the
// grammar (the schema text, thinking, the vocabulary). A failed compile
// is cached too: the same request fails the same way.
func (c *Cache) Get(key string, v *Vocab, opt Options, build func() (Expr, error)) (*Grammar, error) {
	c.mu.Lock()
	el, ok := c.byKey[key]
	if ok {
		c.order.MoveToFront(el)
	} else {
		el = c.order.PushFront(&cacheEntry{key: key})
		c.byKey[key] = el
		for c.order.Len() > c.max {
			old := c.order.Back()
			c.order.Remove(old)
			delete(c.byKey, old.Value.(*cacheEntry).key)
		}
	}
	e := el.Value.(*cacheEntry)
	c.mu.Unlock()
	e.once.Do(func() {
		var x Expr
		if x, e.err = build(); e.err == nil {
			e.g, e.err = Compile(v, x, opt)
		}
	})
	return e.g, e.err
}
