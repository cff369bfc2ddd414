// A SIGBUS safety net for memory-mapped inputs: a file cut short while it is mapped makes a
// read of a page past its new end raise SIGBUS, which no Python code can catch. A guarded
// range turns that fault into a one-line message on stderr and exit status 1 (the CLI's
// "bad input"); a fault outside every guarded range goes to the previous handler.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fk {

// Guard [begin, begin + length): returns a slot id for unguard(), or -1 when every slot is
// taken (the range is then unguarded). Installs the handler on first use.
int sigbus_guard(std::uintptr_t begin, std::size_t length, const std::string& message);
void sigbus_unguard(int slot);

}  // namespace fk
