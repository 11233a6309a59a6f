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

{{/* The Secret the gRPC TLS files come from: tls.secretName, else the one the chart's Certificate writes. */}}
{{- define "airan.tls.secretName" -}}
{{- default (printf "%s-grpc-tls" (include "airan.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{/* auth.mode token: where the token key Secret is mounted */}}
{{- define "airan.auth.dir" -}}/etc/airan/auth{{- end }}

{{/* A caller's client certificate and Secret name: <fullname>-client-<id as a DNS label> */}}
{{- define "airan.clientCertName" -}}
{{- $id := regexReplaceAll "[^a-z0-9-]+" (lower .id) "-" | trimAll "-" -}}
{{- printf "%s-client-%s" (include "airan.fullname" .root) $id | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* the control plane's state (airan `state`): the volume's mount, the SQLite file, the claim */}}
{{- define "airan.state.dir" -}}/var/lib/airan/state{{- end }}
{{- define "airan.state.file" -}}{{ include "airan.state.dir" . }}/state.sqlite{{- end }}
{{- define "airan.state.claimName" -}}
{{- default (printf "%s-state" (include "airan.fullname" .)) .Values.state.volume.existingClaim }}
{{- end }}

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

{{/*
Model store: where a pod's models live, and where airan's cache (AIRAN_CACHE) is. The
control plane and every site's Ray pod use the same path, because the control plane
resolves each model to a directory there (airan/store/registry.py) and hands that path
to the replicas it places on the sites.
*/}}
{{- define "airan.modelCache" -}}
{{- printf "%s/.airan-cache" .Values.modelStore.mountPath }}
{{- end }}

{{- define "airan.configPath" -}}/etc/airan/config.yaml{{- end }}

{{/*
The prepare steps a pod runs before airan starts: what `airan serve` would otherwise
exit asking for, since the server only reads prepared models. The models are those
the control plane resolves at startup (every replica's model and adapters, and the
default model) or, for a site's Ray pod, those its own replicas serve:
  source tiny-random -> airan model prepare tiny --config <config> (every tiny model the config names)
  source smollm2     -> airan model prepare smollm2 [--source modelPrepare.smollm2Source]
  source variant     -> airan model build <name>, with modelPrepare.buildVariants (after smollm2,
                        the parent of every recipe)
local models (and adapters) are staged by the operator. Returns a JSON list of
{name, command}. Call with (dict "root" $ "site" "<site id>"), or site "" for the
control plane.
*/}}
{{- define "airan.modelPrepare.steps" -}}
{{- $root := .root -}}
{{- $mp := $root.Values.modelPrepare -}}
{{- $steps := list -}}
{{- if $mp.enabled -}}
{{- $used := list -}}
{{- range $root.Values.replicas -}}
{{- if or (not $.site) (eq .site $.site) -}}
{{- $used = concat $used (list .model) (.adapters | default list) -}}
{{- end -}}
{{- end -}}
{{- if not .site -}}
{{- $used = append $used ($root.Values.server.default_model | default (first $root.Values.models).name) -}}
{{- end -}}
{{- $tiny := false -}}
{{- $smollm2 := false -}}
{{- $variants := list -}}
{{- range $root.Values.models -}}
{{- if has .name $used -}}
{{- if eq .source "tiny-random" -}}{{- $tiny = true -}}{{- end -}}
{{- if eq .source "smollm2" -}}{{- $smollm2 = true -}}{{- end -}}
{{- if and (eq .source "variant") $mp.buildVariants -}}{{- $variants = append $variants .name -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if $tiny -}}
{{- $steps = append $steps (dict "name" "prepare-tiny" "command" (list "airan" "model" "prepare" "tiny" "--config" (include "airan.configPath" $root))) -}}
{{- end -}}
{{- if or $smollm2 $variants -}}
{{- $command := list "airan" "model" "prepare" "smollm2" -}}
{{- with $mp.smollm2Source -}}{{- $command = concat $command (list "--source" .) -}}{{- end -}}
{{- $steps = append $steps (dict "name" "prepare-smollm2" "command" $command) -}}
{{- end -}}
{{- range $variants -}}
{{- $name := printf "build-%s" (. | lower | replace "." "-" | replace "_" "-") | trunc 63 | trimSuffix "-" -}}
{{- $steps = append $steps (dict "name" $name "command" (list "airan" "model" "build" .)) -}}
{{- end -}}
{{- end -}}
{{- toJson $steps -}}
{{- end }}

{{/*
The initContainers that run those steps, in the pod's image, on the pod's model store.
Call with (dict "root" $ "steps" <steps> "image" <image> "resources" <the main container's>).
*/}}
{{- define "airan.modelPrepare.initContainers" -}}
{{- $root := .root -}}
{{- $resources := $root.Values.modelPrepare.resources | default .resources -}}
{{- range .steps }}
- name: {{ .name }}
  image: {{ $.image | quote }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: {{ toJson .command }}
  env:
    - {name: AIRAN_CACHE, value: {{ include "airan.modelCache" $root | quote }}}
  resources:
    {{- toYaml $resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - {name: config, mountPath: {{ include "airan.configPath" $root | quote }}, subPath: config.yaml, readOnly: true}
    - {name: models, mountPath: {{ $root.Values.modelStore.mountPath | quote }}}
{{- end }}
{{- end }}
