// Starts Swagger UI on the document beside this page (/api/openapi.json), wherever the
// service is mounted. A file of its own so that the page's CSP needs no inline script.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
  });
});
