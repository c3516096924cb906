{{/* dkv.name: the chart's name, or nameOverride. */}}
{{- define "dkv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* dkv.fullname: the release's base name (release name, with the chart's unless it holds it). */}}
{{- define "dkv.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* dkv.chart: chart name and version for the helm.sh/chart label. */}}
{{- define "dkv.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* dkv.labels: the standard labels of every object (ctx: root, component). */}}
{{- define "dkv.labels" -}}
helm.sh/chart: {{ include "dkv.chart" .root }}
{{ include "dkv.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: dkv
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* dkv.selectorLabels: immutable selector labels (ctx: root, component). */}}
{{- define "dkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dkv.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* dkv.image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "dkv.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* dkv.componentName: "<fullname>-<component>" (ctx: root, component). */}}
{{- define "dkv.componentName" -}}
{{- printf "%s-%s" (include "dkv.fullname" .root) .component -}}
{{- end -}}

{{/* dkv.headlessName: the headless Service of a StatefulSet (ctx: root, component). */}}
{{- define "dkv.headlessName" -}}
{{- printf "%s-%s-headless" (include "dkv.fullname" .root) .component -}}
{{- end -}}

{{/* dkv.podDomain: "<headless>.<ns>.svc.<clusterDomain>", the domain of a StatefulSet's pods. */}}
{{- define "dkv.podDomain" -}}
{{- printf "%s.%s.svc.%s" (include "dkv.headlessName" .) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* dkv.clusterToken: the cluster identity every member's data dir is stamped with. */}}
{{- define "dkv.clusterToken" -}}
{{- default (printf "%s-%s" (include "dkv.fullname" .) .Release.Namespace) .Values.clusterToken -}}
{{- end -}}

{{/* dkv.membershipPeers: "name=pod-dns:peerPort,..." of every membership replica (--initial-cluster). */}}
{{- define "dkv.membershipPeers" -}}
{{- $ctx := dict "root" . "component" "membership" -}}
{{- $name := include "dkv.componentName" $ctx -}}
{{- $domain := include "dkv.podDomain" $ctx -}}
{{- $out := list -}}
{{- range $i := until (int .Values.membership.replicas) -}}
{{- $out = append $out (printf "%s-%d=%s-%d.%s:%d" $name $i $name $i $domain (int $.Values.membership.ports.peer)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* dkv.membershipClients: "pod-dns:clientPort,..." of every membership replica (--membership). */}}
{{- define "dkv.membershipClients" -}}
{{- $ctx := dict "root" . "component" "membership" -}}
{{- $name := include "dkv.componentName" $ctx -}}
{{- $domain := include "dkv.podDomain" $ctx -}}
{{- $out := list -}}
{{- range $i := until (int .Values.membership.replicas) -}}
{{- $out = append $out (printf "%s-%d.%s:%d" $name $i $domain (int $.Values.membership.ports.client)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* dkv.tlsSecret: the Secret of one certificate (ctx: root, cert: node-0|membership-1|gateway|envoy|test-client|admin-client). */}}
{{- define "dkv.tlsSecret" -}}
{{- $prefix := default (printf "%s-" (include "dkv.fullname" .root)) .root.Values.tls.secretPrefix -}}
{{- printf "%s%s-tls" $prefix .cert -}}
{{- end -}}

{{/* dkv.tlsVolume: a projected volume of every replica's certificate, each in a directory named after its pod (ctx: root, component, replicas). */}}
{{- define "dkv.tlsVolume" -}}
- name: tls
  projected:
    defaultMode: 0440
    sources:
      {{- range $i := until (int .replicas) }}
      - secret:
          name: {{ include "dkv.tlsSecret" (dict "root" $.root "cert" (printf "%s-%d" $.component $i)) }}
          items:
            - {key: tls.crt, path: {{ include "dkv.componentName" $ }}-{{ $i }}/tls.crt}
            - {key: tls.key, path: {{ include "dkv.componentName" $ }}-{{ $i }}/tls.key}
            - {key: ca.crt, path: {{ include "dkv.componentName" $ }}-{{ $i }}/ca.crt}
      {{- end }}
{{- end -}}

{{/* dkv.tlsFlags: a process's TLS flags for the certificate directory DIR (ctx: dir, prefix). */}}
{{- define "dkv.tlsFlags" -}}
- --{{ .prefix }}cert-file={{ .dir }}/tls.crt
- --{{ .prefix }}key-file={{ .dir }}/tls.key
- --{{ .prefix }}trusted-ca-file={{ .dir }}/ca.crt
{{- end -}}

{{/* dkv.podSecurityContext: the restricted pod security context. */}}
{{- define "dkv.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{/* dkv.containerSecurityContext: the restricted container security context. */}}
{{- define "dkv.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* dkv.podEnv: POD_NAME and POD_NAMESPACE from the downward API (flags use $(POD_NAME)). */}}
{{- define "dkv.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef: {fieldPath: metadata.namespace}
- name: PYTHONUNBUFFERED
  value: "1"
{{- if .Values.dev.liveUpdate.enabled }}
# dev.liveUpdate: the synced sources shadow the installed packages.
- name: PYTHONPATH
  value: {{ include "dkv.devPythonPath" . }}
{{- end }}
{{- end -}}

{{/* dkv.tracingFlags: --otlp-endpoint and --trace-sample-ratio for tracing.otlpEndpoint (every dkv process; the gateway gives Envoy the same). */}}
{{- define "dkv.tracingFlags" -}}
- --otlp-endpoint={{ .Values.tracing.otlpEndpoint }}
- --trace-sample-ratio={{ .Values.tracing.sampleRatio }}
{{- end -}}

{{/*
dev.liveUpdate (tilt/Tiltfile; off by default, never for production). Every pod of the image
gets an emptyDir at dkv.devDir, first filled by an init container with a copy of the installed
packages (dkv, dkv_node, dkv_membership, dkv_gateway) under <devDir>/python, which is first on
PYTHONPATH: Tilt syncs changed sources over that copy (the root filesystem stays read-only).
Each dkv process runs under `python -I -m dkv.cli.devreload run`, which restarts it when Tilt
touches <devDir>/restart (and forwards SIGTERM, so a pod still stops gracefully).
*/}}
{{- define "dkv.devDir" -}}/var/run/dkv-dev{{- end -}}
{{- define "dkv.devPythonPath" -}}{{ include "dkv.devDir" . }}/python{{- end -}}

{{/* dkv.command: a dkv process's command (ctx: root, process), under the restarter with dev.liveUpdate. */}}
{{- define "dkv.command" -}}
{{- if .root.Values.dev.liveUpdate.enabled -}}
["python", "-I", "-m", "dkv.cli.devreload", "run", "--trigger", "{{ include "dkv.devDir" .root }}/restart", "--", {{ .process | quote }}]
{{- else -}}
[{{ .process | quote }}]
{{- end -}}
{{- end -}}

{{/* dkv.devMount: with dev.liveUpdate, the volume's mount, in every container of the image (Tilt syncs into each). */}}
{{- define "dkv.devMount" -}}
- {name: dev-live-update, mountPath: {{ include "dkv.devDir" . }}}
{{- end -}}

{{/* dkv.devVolume: with dev.liveUpdate, its emptyDir. */}}
{{- define "dkv.devVolume" -}}
- name: dev-live-update
  emptyDir: {sizeLimit: 256Mi}
{{- end -}}

{{/* dkv.devInitContainers: with dev.liveUpdate, the init container that copies the installed packages into the volume. */}}
{{- define "dkv.devInitContainers" -}}
initContainers:
  - name: dev-live-update-seed
    image: {{ include "dkv.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["python", "-I", "-m", "dkv.cli.devreload", "seed", "--dest", {{ include "dkv.devPythonPath" . | quote }}, "dkv", "dkv_node", "dkv_membership", "dkv_gateway"]
    resources:
      requests: {cpu: 50m, memory: 64Mi}
      limits: {memory: 256Mi}
    securityContext:
      {{- include "dkv.containerSecurityContext" . | nindent 6 }}
    volumeMounts:
      - {name: dev-live-update, mountPath: {{ include "dkv.devDir" . }}}
{{- end -}}

{{/* dkv.scheduling: topology spread and pod anti-affinity for a component (ctx: root, component, values). */}}
{{- define "dkv.scheduling" -}}
{{- $sel := include "dkv.selectorLabels" . | fromYaml -}}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- else }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- toYaml $sel | nindent 8 }}
{{- end }}
affinity:
{{- with .values.affinity }}
  {{- toYaml . | nindent 2 }}
{{- else }}
  podAntiAffinity:
    {{- if eq .values.podAntiAffinity "hard" }}
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- toYaml $sel | nindent 12 }}
    {{- else }}
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- toYaml $sel | nindent 14 }}
    {{- end }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* dkv.quorumMinAvailable: the PDB's minAvailable that keeps a Raft majority of N replicas. */}}
{{- define "dkv.quorumMinAvailable" -}}
{{- add (div (int .) 2) 1 -}}
{{- end -}}

{{/* dkv.validateValues: fail with a readable message on combinations the schema cannot refuse. */}}
{{- define "dkv.validateValues" -}}
{{- if eq (mod (int .Values.membership.replicas) 2) 0 -}}
{{- fail (printf "membership.replicas must be odd (1, 3, 5...): %d replicas tolerate no more failures than %d" (int .Values.membership.replicas) (sub (int .Values.membership.replicas) 1)) -}}
{{- end -}}
{{- if lt (int .Values.node.replicas) (int .Values.membership.replicationFactor) -}}
{{- fail (printf "node.replicas (%d) must be at least membership.replicationFactor (%d): every shard needs that many nodes" (int .Values.node.replicas) (int .Values.membership.replicationFactor)) -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled .Values.tls.secretPrefix -}}
{{- fail "tls.secretPrefix names Secrets made outside the chart: set tls.certManager.enabled=false with it" -}}
{{- end -}}
{{- range $component := list "membership" "node" -}}
{{- $p := get (get $.Values $component) "ports" -}}
{{- if ne 3 (len (uniq (list (int $p.client) (int $p.peer) (int $p.metrics)))) -}}
{{- fail (printf "%s.ports: client, peer and metrics must be three different ports" $component) -}}
{{- end -}}
{{- end -}}
{{- $g := .Values.gateway.ports -}}
{{- if ne 6 (len (uniq (list (int $g.client) (int $g.xds) (int $g.metrics) (int .Values.frontDoor.port) (int .Values.gateway.envoy.adminPort) (int .Values.gateway.envoy.statsPort)))) -}}
{{- fail "gateway.ports (client, xds, metrics), gateway.envoy.adminPort, gateway.envoy.statsPort and frontDoor.port share a pod: they must be six different ports" -}}
{{- end -}}
{{- if and (ne .Values.frontDoor.service.type "NodePort") (ne .Values.frontDoor.service.type "LoadBalancer") .Values.frontDoor.service.nodePort -}}
{{- fail "frontDoor.service.nodePort needs frontDoor.service.type NodePort or LoadBalancer" -}}
{{- end -}}
{{- end -}}

{{/* dkv.serviceAccountName: the ServiceAccount of dkv's pods. */}}
{{- define "dkv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dkv.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
