{{/* Names: "<fullname>-head", "<fullname>-node" (pods "<fullname>-node-N"), "<fullname>-router". */}}
{{- define "tellodb.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "tellodb.selectorLabels" -}}
app.kubernetes.io/name: tellodb
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tellodb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "tellodb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tellodb.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The head's GCS address, as nodes and routers join it. */}}
{{- define "tellodb.headAddress" -}}
{{ include "tellodb.fullname" . }}-head.{{ .Release.Namespace }}.svc:{{ .Values.head.port }}
{{- end -}}

{{- define "tellodb.routerUrl" -}}
http://{{ include "tellodb.fullname" . }}-router.{{ .Release.Namespace }}.svc:{{ .Values.router.service.port }}
{{- end -}}

{{- define "tellodb.rayTokenSecret" -}}
{{- default (printf "%s-ray-token" (include "tellodb.fullname" .)) .Values.rayToken.existingSecret -}}
{{- end -}}

{{- define "tellodb.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "tellodb.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "tellodb.apiKeySecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}api-key{{ end -}}
{{- end -}}

{{/* The initial members: the node StatefulSet's pod names for node.replicas. */}}
{{- define "tellodb.nodeNames" -}}
{{- $names := list -}}
{{- range $i := until (int .Values.node.replicas) -}}
{{- $names = append $names (printf "%s-node-%d" (include "tellodb.fullname" $) $i) -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* cluster.yaml without the member list, whose changes after the install only matter to a new
     head; pods restart when this changes (checksum/config), not when node.replicas does. */}}
{{- define "tellodb.configChecksum" -}}
{{- dict "shards" .Values.shards "config" .Values.config | toJson | sha256sum -}}
{{- end -}}

{{/* Environment every role shares: its pod's name and IP (Ray's node address) and no downloads. */}}
{{- define "tellodb.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HF_HUB_OFFLINE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
- name: HOME
  value: /home/tellodb
{{- with .Values.rayPortRange }}
- name: TELLODB_RAY_PORT_RANGE
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Nodes and routers: how long they outlive a head that is away (they set Ray's own timeout from it). */}}
{{- define "tellodb.headOutageEnv" -}}
- name: TELLODB_HEAD_OUTAGE_S
  value: {{ .Values.headOutageSeconds | quote }}
{{- end -}}

{{/* The command-line arguments every role shares: the token file, cluster.yaml and the pod IP. */}}
{{- define "tellodb.commonArgs" -}}
- --node-ip
- $(POD_IP)
- --ray-token-file
- /etc/tellodb/ray/{{ .Values.rayToken.key }}
- --config
- /etc/tellodb/config/cluster.yaml
{{- end -}}

{{- define "tellodb.commonMounts" -}}
- name: ray-token
  mountPath: /etc/tellodb/ray
  readOnly: true
- name: config
  mountPath: /etc/tellodb/config
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
- name: home
  mountPath: /home/tellodb
{{- end -}}

{{- define "tellodb.commonVolumes" -}}
- name: ray-token
  secret:
    secretName: {{ include "tellodb.rayTokenSecret" . }}
    defaultMode: 0440  # with fsGroup: readable by the pod user only through its group
- name: config
  configMap:
    name: {{ include "tellodb.fullname" . }}-config
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{- define "tellodb.podSpecCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
enableServiceLinks: false
{{- end -}}
