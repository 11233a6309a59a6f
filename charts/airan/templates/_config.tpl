{{/*
Checks that need to look across values. values.schema.json checks the shape of
every key, but JSON Schema cannot say "replicas[].model must name one of
models[]", so these run at render time (helm install/template/lint) and fail
with the offending path, what was given and what is allowed. They mirror the
cross-reference checks of airan/config.py (AiranConfig._references_resolve).
*/}}
{{- define "airan.validate" -}}
{{- $siteIds := list -}}
{{- range $i, $s := .Values.sites -}}
{{- if has $s.id $siteIds -}}
{{- fail (printf "sites[%d].id: duplicate site id %q (each edge site is listed once)" $i $s.id) -}}
{{- end -}}
{{- $siteIds = append $siteIds $s.id -}}
{{- end -}}
{{- $modelNames := list -}}
{{- range $i, $m := .Values.models -}}
{{- if has $m.name $modelNames -}}
{{- fail (printf "models[%d].name: duplicate model variant %q" $i $m.name) -}}
{{- end -}}
{{- $modelNames = append $modelNames $m.name -}}
{{- end -}}
{{- range $i, $r := .Values.replicas -}}
{{- if not (has $r.site $siteIds) -}}
{{- fail (printf "replicas[%d].site: unknown site %q; sites in values: %s" $i $r.site (join ", " $siteIds)) -}}
{{- end -}}
{{- if not (has $r.model $modelNames) -}}
{{- fail (printf "replicas[%d].model: unknown model variant %q; define it under models (known variants: %s)" $i $r.model (join ", " $modelNames)) -}}
{{- end -}}
{{- end -}}
{{- with .Values.server.default_model -}}
{{- if not (has . $modelNames) -}}
{{- fail (printf "server.default_model: unknown model variant %q (known variants: %s)" . (join ", " $modelNames)) -}}
{{- end -}}
{{- end -}}
{{- if eq (int .Values.server.port) (int .Values.server.metrics_port) -}}
{{- fail (printf "server.metrics_port: must differ from server.port (both %d)" (int .Values.server.port)) -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled (eq (int .Values.server.metrics_port) 0) -}}
{{- fail "serviceMonitor.enabled: needs server.metrics_port > 0 (0 turns the metrics endpoint off)" -}}
{{- end -}}
{{- if and (eq .Values.auth.mode "mtls") (not (and .Values.tls.enabled .Values.tls.clientAuth)) -}}
{{- fail "auth.mode mtls: needs tls.enabled and tls.clientAuth (the client certificate names the caller); or set auth.mode token (with auth.tokenSecretName) or none" -}}
{{- end -}}
{{- if and (eq .Values.auth.mode "token") (not .Values.auth.tokenSecretName) -}}
{{- fail "auth.mode token: needs auth.tokenSecretName, a Secret with the key token.key (at least 32 random bytes)" -}}
{{- end -}}
{{- range $i, $c := .Values.auth.controllers -}}
{{- range $c.sites | default (list "*") -}}
{{- if and (ne . "*") (not (has . $siteIds)) -}}
{{- fail (printf "auth.controllers[%d].sites: unknown site %q; sites in values: %s (or \"*\")" $i . (join ", " $siteIds)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
The airan config (airan/config.py's AiranConfig) the control plane reads.
Keys are copied from values under the same names; the chart only adds what
Kubernetes decides: where the server listens, the TLS file paths of the
mounted Secret, and how to reach the RayCluster.
*/}}
{{- define "airan.config" -}}
{{- $sites := list -}}
{{- range .Values.sites -}}
{{- /* explicit cpus/gpus/memory: the same numbers size the site's Ray worker pod */ -}}
{{- $site := dict "id" .id "cpus" .cpus "gpus" (.gpus | default 0) "memory_gb" .memory_gb -}}
{{- $site = merge $site (pick . "x_km" "y_km" "latency_ms" "labels") -}}
{{- $sites = append $sites $site -}}
{{- end -}}
{{- $server := pick .Values.server "port" "metrics_port" "grace_s" "default_model" "max_receive_message_bytes" "max_send_message_bytes" -}}
{{- $_ := set $server "host" "0.0.0.0" -}}
{{- if .Values.tls.enabled -}}
{{- $dir := include "airan.tls.dir" . -}}
{{- $_ := set $server "tls_cert_file" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $server "tls_key_file" (printf "%s/tls.key" $dir) -}}
{{- if .Values.tls.clientAuth -}}
{{- $_ := set $server "tls_client_ca_file" (printf "%s/ca.crt" $dir) -}}
{{- end -}}
{{- end -}}
{{- if not $server.default_model -}}{{- $_ := unset $server "default_model" -}}{{- end -}}
{{- /* written section by section, in airan's order, so the file reads like airan/configs/default.yaml */ -}}
sites:
{{- range $sites }}
  - id: {{ .id | quote }}
    {{- toYaml (omit . "id") | nindent 4 }}
{{- end }}
models:
{{- range .Values.models }}
  - name: {{ .name | quote }}
    {{- toYaml (omit . "name") | nindent 4 }}
{{- end }}
replicas:
{{- range .Values.replicas }}
  - {site: {{ .site | quote }}, model: {{ .model | quote }}{{ if hasKey . "count" }}, count: {{ .count }}{{ end }}{{ with .adapters }}, adapters: {{ toJson . }}{{ end }}}
{{- else }} []
{{- end }}
{{- range $section := list "engine" "router" "limits" "radio" "reliability" "catalog" }}
{{- with index $.Values $section }}
{{ $section }}:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
server:
{{- toYaml $server | nindent 2 }}
{{- $auth := pick .Values.auth "mode" "controllers" }}
{{- if eq .Values.auth.mode "token" }}
{{- $_ := set $auth "token_key_file" (printf "%s/token.key" (include "airan.auth.dir" .)) }}
{{- end }}
auth:
{{- toYaml $auth | nindent 2 }}
cluster:
  mode: connect
  address: {{ include "airan.rayAddress" . | quote }}
  namespace: {{ .Values.cluster.namespace | quote }}
  detach_replicas: {{ .Values.cluster.detach_replicas }}
state:
  backend: {{ .Values.state.backend | quote }}
  path: {{ include "airan.state.file" . | quote }}
  max_ran_reports_per_site: {{ .Values.state.max_ran_reports_per_site }}
{{- end }}
