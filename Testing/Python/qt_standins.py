"""Stand-ins for the few Qt classes the panel uses, for machines without Slicer's Qt (slicer-core has
none). Widgets are built from the real .ui file, so a name the panel uses that the .ui lacks fails."""
from __future__ import annotations

import sys
import types
import xml.etree.ElementTree as ET
from collections import defaultdict


class Qt:
    Unchecked, Checked = 0, 2
    UserRole = 256
    ItemIsUserCheckable = 16


class QListWidgetItem:
    def __init__(self, text=""):
        self.text, self._data, self._flags, self._check, self.listWidget = text, {}, 0, Qt.Unchecked, None

    def setData(self, role, value):
        self._data[role] = value

    def data(self, role):
        return self._data.get(role)

    def setIcon(self, icon):
        self.icon = icon

    def flags(self):
        return self._flags

    def setFlags(self, flags):
        self._flags = flags

    def checkState(self):
        return self._check

    def setCheckState(self, state):
        self._check = state
        if self.listWidget is not None:
            self.listWidget.emit("itemChanged(QListWidgetItem*)", self)


class QColor:
    @staticmethod
    def fromRgbF(r, g, b, a=1.0):
        return (r, g, b, a)


class QPixmap:
    def __init__(self, width, height):
        self.size = (width, height)

    def fill(self, color):
        self.color = color


class QIcon:
    def __init__(self, pixmap=None):
        self.pixmap = pixmap


class QTimer:
    """Never fires by itself: tests call tick() (= one timeout) explicitly."""

    def __init__(self):
        self.active, self.interval, self.slots = False, 0, []

    def setInterval(self, msec):
        self.interval = msec

    def connect(self, signal, slot):
        self.slots.append(slot)

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def tick(self):
        for slot in list(self.slots):
            slot()


class QFileDialog:
    nextSaveName = ""

    @staticmethod
    def getSaveFileName(*args):
        return QFileDialog.nextSaveName


class StandInWidget:
    """enabled/visible/text/value and PythonQt-style connect(signal, slot); click() fires clicked()."""

    def __init__(self, name, className):
        self.name, self.className = name, className
        self.enabled, self.visible, self.text, self.value = True, True, "", 0
        self.slots = defaultdict(list)
        self._checkedNodes = []

    def connect(self, signal, slot):
        self.slots[signal].append(slot)

    def emit(self, signal, *args):
        for slot in list(self.slots[signal]):
            slot(*args)

    def click(self):
        assert self.enabled, f"{self.name} is disabled"
        self.emit("clicked(bool)")

    def setValue(self, value):
        self.value = value

    def checkedNodes(self):
        return list(self._checkedNodes)

    def __repr__(self):
        return f"<{self.className} {self.name} enabled={self.enabled}>"


class StandInListWidget(StandInWidget):
    def __init__(self, name, className):
        super().__init__(name, className)
        self.items = []

    def clear(self):
        self.items = []

    def addItem(self, item):
        item.listWidget = self
        self.items.append(item)

    def item(self, row):
        return self.items[row]

    @property
    def count(self):
        return len(self.items)


def uiFromFile(path):
    """A namespace of stand-in widgets, one per named widget of the .ui file."""
    widgets = {}
    for element in ET.parse(path).iter("widget"):
        cls = StandInListWidget if element.get("class") == "QListWidget" else StandInWidget
        widgets[element.get("name")] = cls(element.get("name"), element.get("class"))
    return types.SimpleNamespace(**widgets)


def install():
    """Register this module as `qt` unless the real one is importable."""
    try:
        import qt  # noqa: F401
    except ImportError:
        module = types.ModuleType("qt")
        for name in ("Qt", "QListWidgetItem", "QColor", "QPixmap", "QIcon", "QTimer", "QFileDialog"):
            setattr(module, name, globals()[name])
        module.isStandIn = True
        sys.modules["qt"] = module
