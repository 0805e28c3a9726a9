// Packed CPU weights kept across op calls: see weight_cache.h.
#include "weight_cache.h"

#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <utility>

#include "cpu/isa.h"

namespace fastcells {
namespace {

constexpr size_t kMaxEntries = 64;
// Bytes the entries may hold in all (copies and packs); a layer larger than
// this is not cached.
constexpr size_t kMaxBytes = size_t(256) << 20;

// What a weight was when its packs were made.
struct Source {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage{c10::intrusive_ptr<c10::StorageImpl>()};
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  int64_t version = 0;
  std::vector<uint8_t> bytes;  // the weight's contents
};

bool cacheable(const at::Tensor& t) {
  return t.defined() && t.is_cpu() && t.layout() == at::kStrided && !t.is_inference() &&
         t.has_storage() && t.is_contiguous();
}

Source source_of(const at::Tensor& t) {
  Source s;
  s.storage = t.storage().getWeakStorageImpl();
  s.data = t.data_ptr();
  s.sizes = t.sizes().vec();
  s.strides = t.strides().vec();
  s.dtype = t.scalar_type();
  s.version = t._version();
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  s.bytes.assign(p, p + t.nbytes());
  return s;
}

// Whether `t` is the weight `s` describes, unchanged. The cheap tests come
// first; the byte comparison catches edits the version counter misses.
bool same(const Source& s, const at::Tensor& t) {
  if (s.storage.expired() || s.storage._unsafe_get_target() != t.storage().unsafeGetStorageImpl())
    return false;
  if (s.data != t.data_ptr() || s.dtype != t.scalar_type() || t.sizes() != at::IntArrayRef(s.sizes) ||
      t.strides() != at::IntArrayRef(s.strides) || s.version != t._version())
    return false;
  return s.bytes.size() == t.nbytes() &&
         std::memcmp(s.bytes.data(), t.data_ptr(), s.bytes.size()) == 0;
}

// Entries whose weights change at every call (training) would cost a copy of
// the weights per call and never serve one: an entry replaced before its
// first hit becomes a tombstone (no copies, no packs), and the key is cached
// again only at every kRetryAfter-th miss, so that a model that starts
// decoding with fixed weights gets its cache back.
constexpr int64_t kRetryAfter = 16;

struct Entry {
  std::vector<Source> sources;
  std::shared_ptr<void> packs;
  size_t bytes = 0;  // the copies and (an estimate of) the packs
  uint64_t last_use = 0;
  int64_t hits = 0;
  int64_t skipped = -1;  // >= 0: a tombstone, and the misses it has let pass

  bool orphaned() const {
    for (const Source& s : sources)
      if (s.storage.expired()) return true;
    return false;
  }
};

// Key: compute type, product form, ISA path and the weights' data pointers.
using Key = std::vector<uintptr_t>;

struct Cache {
  std::mutex mu;
  std::map<Key, Entry> entries;
  uint64_t tick = 0;
  int64_t hits = 0, misses = 0, stores = 0;
  size_t bytes = 0;

  void erase(std::map<Key, Entry>::iterator it) {
    bytes -= it->second.bytes;
    entries.erase(it);
  }
  // Drops the entries of freed weights, then the least recently used ones
  // while over either bound.
  void trim() {
    for (auto it = entries.begin(); it != entries.end();) {
      auto next = std::next(it);
      if (it->second.orphaned()) erase(it);
      it = next;
    }
    while (!entries.empty() && (entries.size() > kMaxEntries || bytes > kMaxBytes)) {
      auto oldest = entries.begin();
      for (auto it = entries.begin(); it != entries.end(); ++it)
        if (it->second.last_use < oldest->second.last_use) oldest = it;
      erase(oldest);
    }
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: calls may run during exit
  return *c;
}

template <typename T>
Key key_of(const std::vector<const at::Tensor*>& ws, bool bf16) {
  Key k{sizeof(T), bf16 ? 1u : 0u, static_cast<uintptr_t>(cpu::active_isa().id)};
  for (const at::Tensor* w : ws) k.push_back(reinterpret_cast<uintptr_t>(w->data_ptr()));
  return k;
}

bool all_cacheable(const std::vector<const at::Tensor*>& ws) {
  for (const at::Tensor* w : ws)
    if (!cacheable(*w)) return false;
  return true;
}

void clear_op() { clear_weight_cache(); }

TORCH_LIBRARY_FRAGMENT(fastcells, m) {
  m.def("clear_weight_cache() -> ()", &clear_op);
  m.def("weight_cache_stats() -> int[]", &weight_cache_stats);
}

}  // namespace

bool weight_cache_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FASTCELLS_WEIGHT_CACHE");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

template <typename T>
std::shared_ptr<LayerPacks<T>> find_packs(const std::vector<const at::Tensor*>& ws, bool bf16,
                                          bool* hit) {
  *hit = false;
  if (!weight_cache_enabled() || !all_cacheable(ws)) return nullptr;
  const Key key = key_of<T>(ws, bf16);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const auto it = c.entries.find(key);
  if (it == c.entries.end()) {
    ++c.misses;
    return std::make_shared<LayerPacks<T>>();
  }
  Entry& e = it->second;
  e.last_use = ++c.tick;
  bool valid = e.skipped < 0 && e.sources.size() == ws.size();
  for (size_t i = 0; valid && i < ws.size(); ++i) valid = same(e.sources[i], *ws[i]);
  if (valid) {
    ++c.hits;
    ++e.hits;
    *hit = true;
    return std::static_pointer_cast<LayerPacks<T>>(e.packs);
  }
  ++c.misses;
  if (e.skipped >= 0) {  // tombstone: pack privately, except every kRetryAfter-th miss
    if (++e.skipped % kRetryAfter != 0) return nullptr;
    c.erase(it);
    return std::make_shared<LayerPacks<T>>();
  }
  if (e.hits == 0) {  // replaced before its first hit: weights that change every call
    c.bytes -= e.bytes;
    e = Entry();
    e.last_use = c.tick;
    e.skipped = 0;
    return nullptr;
  }
  c.erase(it);
  return std::make_shared<LayerPacks<T>>();
}

template <typename T>
void publish_packs(const std::vector<const at::Tensor*>& ws, bool bf16,
                   std::shared_ptr<LayerPacks<T>> packs) {
  if (!packs) return;
  size_t bytes = 0;
  for (const at::Tensor* w : ws) bytes += w->nbytes() + w->numel() * sizeof(T);
  if (bytes > kMaxBytes) return;
  Entry e;
  for (const at::Tensor* w : ws) e.sources.push_back(source_of(*w));
  e.packs = std::move(packs);
  e.bytes = bytes;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  e.last_use = ++c.tick;
  const Key key = key_of<T>(ws, bf16);
  const auto old = c.entries.find(key);
  if (old != c.entries.end()) c.erase(old);
  c.bytes += bytes;
  ++c.stores;
  c.entries.emplace(key, std::move(e));
  c.trim();
}

template std::shared_ptr<LayerPacks<float>> find_packs<float>(
    const std::vector<const at::Tensor*>&, bool, bool*);
template std::shared_ptr<LayerPacks<double>> find_packs<double>(
    const std::vector<const at::Tensor*>&, bool, bool*);
template void publish_packs<float>(const std::vector<const at::Tensor*>&, bool,
                                   std::shared_ptr<LayerPacks<float>>);
template void publish_packs<double>(const std::vector<const at::Tensor*>&, bool,
                                    std::shared_ptr<LayerPacks<double>>);

void clear_weight_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.entries.clear();
  c.bytes = 0;
  c.hits = c.misses = c.stores = 0;
}

std::vector<int64_t> weight_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {static_cast<int64_t>(c.entries.size()), c.hits, c.misses, c.stores};
}

}  // namespace fastcells
