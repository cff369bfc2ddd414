// See sigbus_guard.h. The handler only reads the slot table (atomics, written before a range
// is published) and calls write() and _exit(), both async-signal-safe.
#include "fidelity_kld/sigbus_guard.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>

namespace fk {
namespace {

constexpr int kSlots = 256;
constexpr std::size_t kMessage = 1024;

struct Slot {
  std::atomic<std::uintptr_t> begin{0};
  std::atomic<std::uintptr_t> end{0};
  char message[kMessage];
  std::size_t length = 0;
};

Slot slots[kSlots];
std::mutex table_mutex;  // serialises guard/unguard (the handler takes no lock)
struct sigaction previous_action;
bool installed = false;

void on_sigbus(int signum, siginfo_t* info, void* context) {
  const auto addr = reinterpret_cast<std::uintptr_t>(info->si_addr);
  for (const Slot& s : slots) {
    const std::uintptr_t b = s.begin.load(std::memory_order_acquire);
    if (b != 0 && addr >= b && addr < s.end.load(std::memory_order_acquire)) {
      ssize_t ignored = write(STDERR_FILENO, s.message, s.length);
      (void)ignored;
      _exit(1);
    }
  }
  // Not a guarded range: back to the previous disposition; returning re-runs the faulting
  // access, which then takes that path (the default: terminate with a core dump).
  sigaction(SIGBUS, &previous_action, nullptr);
  (void)signum;
  (void)context;
}

void install() {
  struct sigaction action;
  std::memset(&action, 0, sizeof action);
  action.sa_sigaction = on_sigbus;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  if (sigaction(SIGBUS, &action, &previous_action) == 0) installed = true;
}

}  // namespace

int sigbus_guard(std::uintptr_t begin, std::size_t length, const std::string& message) {
  std::lock_guard<std::mutex> lock(table_mutex);
  if (!installed) install();
  for (int i = 0; i < kSlots; ++i) {
    Slot& s = slots[i];
    if (s.begin.load(std::memory_order_relaxed) != 0) continue;
    s.length = message.size() < kMessage ? message.size() : kMessage;
    std::memcpy(s.message, message.data(), s.length);
    s.end.store(begin + length, std::memory_order_release);
    s.begin.store(begin, std::memory_order_release);
    return i;
  }
  return -1;
}

void sigbus_unguard(int slot) {
  std::lock_guard<std::mutex> lock(table_mutex);
  if (slot < 0 || slot >= kSlots) return;
  slots[slot].begin.store(0, std::memory_order_release);
  slots[slot].end.store(0, std::memory_order_release);
}

}  // namespace fk
