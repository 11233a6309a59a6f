{{/*
Names. The RayCluster's head Service is "<raycluster>-head-svc" (KubeRay's
naming), so the base name is capped at 54 characters to keep it a valid
63-character DNS label.
*/}}
{{- define "airan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 54 | trimSuffix "-" }}
{{- end }}

{{- define "airan.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "airan.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "airan.rayClusterName" -}}
{{- include "airan.fullname" . }}
{{- end }}

{{- define "airan.controlPlaneName" -}}
{{- include "airan.fullname" . }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "airan.labels" -}}
helm.sh/chart: {{ include "airan.chart" . }}
app.kubernetes.io/name: {{ include "airan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: airan
{{- end }}

{{/* Selects the control-plane pods only (never the Ray pods). */}}
{{- define "airan.controlPlane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "airan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/*
Image for a flavour: "<repository>:<tag>-<flavor>" (tag defaults to the chart's
appVersion), matching the tags the repo's Dockerfile is built and pushed with.
Call with (dict "root" $ "flavor" "cpu").
*/}}
{{- define "airan.image" -}}
{{- $img := .root.Values.image -}}
{{- printf "%s:%s-%s" $img.repository (default .root.Chart.AppVersion $img.tag) .flavor }}
{{- end }}

{{/* Where the control plane finds Ray: explicit cluster.address, else the head's Ray client port. */}}
{{- define "airan.rayAddress" -}}
{{- if .Values.cluster.address }}
{{- .Values.cluster.address }}
{{- else }}
{{- printf "ray://%s-head-svc.%s.svc:%d" (include "airan.rayClusterName" .) .Release.Namespace (int .Values.ray.head.clientPort) }}
{{- end }}
{{- end }}

{{/* TLS: where the Secret is mounted and the names of its keys (cert-manager's layout). */}}
{{- define "airan.tls.dir" -}}/etc/airan/tls{{- end }}

{{- define "airan.tls.serverName" -}}
{{- default (printf "%s.%s.svc" (include "airan.controlPlaneName" .) .Release.Namespace) .Values.tls.serverName }}
{{- end }}

{{/*
Ray's --resources flag value for one site. KubeRay pastes rayStartParams into
a shell command line, so the JSON goes in escaped double quotes (the format
KubeRay documents: '"{\"Custom1\": 1}"'). 1000 units as in airan's local mode
(airan.serving.cluster.sites.SITE_RESOURCE_UNITS): each replica asks for one.
*/}}
{{- define "airan.site.rayResources" -}}
{{- $res := dict (printf "site:%s" .id) 1000 -}}
{{- printf "\"%s\"" (toJson $res | replace "\"" "\\\"") }}
{{- end }}

{{/*
Probe handler against the grpc.health.v1 service the airan server registers.
Plain gRPC: the kubelet's native gRPC probe. With TLS the kubelet probe cannot
connect (it speaks plaintext only), so an exec probe runs the same health
check from inside the container over TLS, trusting ca.crt and checking the
certificate against the Service DNS name; with clientAuth it presents the
server's own certificate, which therefore must allow client auth (cert-manager's
default usages do).
*/}}
{{- define "airan.probeHandler" -}}
{{- if .Values.tls.enabled -}}
exec:
  command:
    - python
    - -c
    - |
      import os, sys, grpc
      from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
      tls_dir, port, name, mode, service, timeout = sys.argv[1:7]
      read = lambda f: open(os.path.join(tls_dir, f), "rb").read()
      mtls = mode == "mtls"
      creds = grpc.ssl_channel_credentials(read("ca.crt"), read("tls.key") if mtls else None, read("tls.crt") if mtls else None)
      with grpc.secure_channel("127.0.0.1:" + port, creds, options=[("grpc.ssl_target_name_override", name)]) as ch:
          status = g.HealthStub(ch).Check(h.HealthCheckRequest(service=service), timeout=float(timeout)).status
      sys.exit(0 if status == h.HealthCheckResponse.SERVING else 1)
    - {{ include "airan.tls.dir" . | quote }}
    - {{ .Values.server.port | toString | quote }}
    - {{ include "airan.tls.serverName" . | quote }}
    - {{ ternary "mtls" "tls" (.Values.tls.clientAuth | default false) | quote }}
    - {{ .Values.probes.service | quote }}
    # leave the interpreter a second of the kubelet's timeout to start
    - {{ max 1 (sub (int .Values.probes.timeoutSeconds) 1) | toString | quote }}
{{- else -}}
grpc:
  port: {{ .Values.server.port }}
  service: {{ .Values.probes.service | quote }}
{{- end }}
{{- end }}

{{- define "airan.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "airan.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}
