"""Headless Chromium (Debian's package) driven over the DevTools protocol: open a page, choose a file,
press a button, read the page, take a screenshot; what a user does, in a real browser. Skips the
test, with the reason, where chromium is not installed."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


class Browser:
    def __init__(self, profile: Path, width: int = 1280, height: int = 900):
        import websocket

        binary = shutil.which("chromium")
        if binary is None:
            pytest.skip("no headless browser: apt-get install chromium")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--window-size={width},{height}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise AssertionError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.calls, self.loaded = 0, False
        self.send("Page.enable")

    def send(self, method: str, **params) -> dict:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == self.calls:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def _receive(self) -> dict:
        message = json.loads(self.ws.recv())
        if message.get("method") == "Page.loadEventFired":
            self.loaded = True
        return message

    def _wait_loaded(self) -> None:
        while not self.loaded:
            self._receive()

    def open(self, url: str) -> None:
        self.loaded = False
        self.send("Page.navigate", url=url)
        self._wait_loaded()

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def choose_file(self, selector: str, path: Path) -> None:
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def click_and_wait(self, selector: str) -> None:
        """Click (a submit button): the next page has loaded when this returns."""
        self.loaded = False
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        self._wait_loaded()

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
