"""A directory tree as JSON: relative path -> [type, mode, owner, group, size, sha256 or link].

python3 tree.py ROOT
"""

import grp
import hashlib
import json
import os
import pwd
import stat
import sys

root = sys.argv[1]
entries = {}
for top, dirs, files in os.walk(root):
    for name in sorted(dirs + files):
        path = os.path.join(top, name)
        info = os.lstat(path)
        kind = (
            "dir"
            if stat.S_ISDIR(info.st_mode)
            else "link"
            if stat.S_ISLNK(info.st_mode)
            else "file"
        )
        content = ""
        if kind == "file":
            with open(path, "rb") as handle:
                content = hashlib.sha256(handle.read()).hexdigest()
        elif kind == "link":
            content = os.readlink(path)
        entries[os.path.relpath(path, root)] = [
            kind,
            oct(stat.S_IMODE(info.st_mode)),
            pwd.getpwuid(info.st_uid).pw_name,
            grp.getgrgid(info.st_gid).gr_name,
            info.st_size if kind == "file" else 0,
            content,
        ]
print(json.dumps(entries, sort_keys=True))
