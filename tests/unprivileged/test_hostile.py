"""The hostile-container cases of tests/security/, run again as an unprivileged caller.

tests/security/ runs them as root. Through tests/test_unprivileged.py this
module runs them as `nobody`, whose containers take the other path (one id
mapped, setgroups denied, no cgroup of their own): a planted link, a PID
file that is a FIFO, a leaked fd, a forged or hostile reply and the host's
interpreter must hold there too. Run as root, it collects nothing: those
cases have already run as root where they are defined.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.geteuid() != 0:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "security"))
    from test_escapes import (  # noqa: F401  (collected by pytest from here)
        test_a_container_cannot_reach_into_an_excursion,
        test_proc_links_name_only_files_inside,
        test_the_host_interpreter_cannot_be_opened_for_writing,
    )
    from test_file_descriptors import (  # noqa: F401
        test_a_callable_holds_no_fd_of_the_set_up,
        test_a_leaked_fd_used_as_cwd_reaches_nothing,
        test_only_stdio_by_default,
    )
    from test_pid_files import (  # noqa: F401
        test_a_pid_file_that_is_no_regular_file_hangs_nothing,
        test_read_pid_file_of_an_exited_container_raises_at_once,
    )
    from test_setup_by_fd import (  # noqa: F401
        exposed,
        outside,
        test_a_dangling_link_in_the_way_is_refused_naming_it,
        test_a_link_in_a_writable_mapping_resolves_inside,
        test_a_link_to_the_root_of_the_host_stays_inside,
        test_a_symlink_item_to_a_host_path_creates_nothing_there,
    )
    from test_untrusted_data import (  # noqa: F401
        box,
        test_an_excursion_imports_nothing_from_the_container,
        test_hostile_exceptions_do_not_unwind_into_the_server,
        test_keyboard_interrupt_and_system_exit_arrive_wrapped,
    )
