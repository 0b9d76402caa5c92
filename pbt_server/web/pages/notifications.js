// The web demo's notification bar: unhandled task errors, by their ErrorLevel.
pbt.connect().then((session) => {
  session.onNotification = (n) => {
    const note = document.createElement("div");
    note.className = `note ${n.severity}`;
    note.dataset.code = n.code;
    note.textContent = `${n.pageName}: ${n.code}: ${n.text}`;
    document.getElementById("notifications").append(note);
    setTimeout(() => note.remove(), 8000);
  };
  session.onClose = (error) => {
    if (error) session.onNotification({ severity: "Error", pageName: "Session", code: error.code, text: error.text });
  };
});
