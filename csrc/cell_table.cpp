// torch.ops.fastcells.cell_table(): the C++ table of cells (kernels/cell_table.h)
// as text, one line per cell in code order, e.g.
//   code=0 name=LSTM gates=4 cell_state=1 extra=1 proj=1 base=0 norms=0 cuda=1
// so that tests/test_cell_table.py can check fastcells/_cells.py against it.
#include <torch/library.h>

#include <sstream>
#include <string>

#include "kernels/cell_table.h"

namespace fastcells {
namespace {

std::string cell_table() {
  std::ostringstream o;
  for (int m = 0; m < kernels::kNumCells; ++m) {
    const kernels::CellInfo c = kernels::cell_info(m);
    o << "code=" << c.code << " name=" << c.name << " gates=" << c.gates
      << " cell_state=" << int(c.cell_state) << " extra=" << c.extra << " proj=" << int(c.proj)
      << " base=" << c.base << " norms=" << c.norms << " cuda=" << int(c.cuda) << "\n";
  }
  return o.str();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcells, m) { m.def("cell_table() -> str", &cell_table); }

}  // namespace fastcells
