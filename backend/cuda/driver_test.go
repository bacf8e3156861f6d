//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"reflect"
	"testing"
)

// Every function of the driver table is bound when the driver loads: a
// field missing from the symbol map would stay nil and panic at its first
// call on a GPU, where CI cannot see it.
func TestDriverSymbolsCoverEveryFunction(t *testing.T) {
	var d driverAPI
	bound := map[uintptr]string{}
	for name, ptr := range d.symbols() {
		v := reflect.ValueOf(ptr)
		if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Func {
			t.Errorf("symbol %s binds a %T, want a pointer to a func field", name, ptr)
			continue
		}
		bound[v.Pointer()] = name
	}
	optional := map[string]bool{"cuGraphGetEdges": true}
	typ, val := reflect.TypeOf(d), reflect.ValueOf(&d).Elem()
	for i := range typ.NumField() {
		f := typ.Field(i)
		if f.Type.Kind() != reflect.Func || optional[f.Name] {
			continue
		}
		if _, ok := bound[val.Field(i).Addr().Pointer()]; !ok {
			t.Errorf("driver function %s has no symbol in the binding map", f.Name)
		}
	}
}
